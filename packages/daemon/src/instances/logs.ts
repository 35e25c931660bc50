/**
 * The workload's output, kept on the host per instance as NDJSON (one chunk per line:
 * time, stream, base64 data), so it survives the VM, the daemon, and a stopped instance.
 * Appends are synchronous: a follower can read the file and then switch to live events with
 * no gap and no duplicate.
 */
import { EventEmitter } from 'node:events';
import { appendFileSync, closeSync, createReadStream, openSync, readSync, statSync } from 'node:fs';
import readline from 'node:readline';
import type { Stream } from '@aegis/protocol';

export interface LogEntry {
  timeMs: number;
  stream: Stream;
  /** base64 */
  data: string;
}

export interface LogEnd {
  state: string;
  exitCode: number | null;
  stateReason?: string;
}

export class LogStore extends EventEmitter<{ entry: [LogEntry]; end: [LogEnd] }> {
  private ended: LogEnd | undefined;
  private checkedTail = false;

  constructor(readonly file: string) {
    super();
    this.setMaxListeners(0);
  }

  append(stream: Stream, data: Buffer): void {
    const entry: LogEntry = { timeMs: Date.now(), stream, data: data.toString('base64') };
    // A crash may have left a torn last line; start ours on a fresh one so it is not lost too.
    const sep = this.checkedTail ? '' : endsTorn(this.file) ? '\n' : '';
    this.checkedTail = true;
    appendFileSync(this.file, sep + JSON.stringify({ t: entry.timeMs, s: stream, d: entry.data }) + '\n', { mode: 0o600 });
    this.emit('entry', entry);
  }

  end(info: LogEnd): void {
    if (this.ended) return;
    this.ended = info;
    this.emit('end', info);
  }

  get endInfo(): LogEnd | undefined {
    return this.ended;
  }

  /** Stored entries, oldest first, up to the file's size now; `tail` keeps only the last N. */
  async *read(tail?: number, uptoBytes?: number): AsyncGenerator<LogEntry> {
    const size = uptoBytes ?? fileSize(this.file);
    if (size === 0) return;
    const rl = readline.createInterface({ input: createReadStream(this.file, { end: size - 1 }), crlfDelay: Infinity });
    const ring: LogEntry[] = [];
    for await (const line of rl) {
      const entry = parseLine(line);
      if (!entry) continue;
      if (tail === undefined) yield entry;
      else {
        ring.push(entry);
        if (ring.length > tail) ring.shift();
      }
    }
    yield* ring;
  }
}

function endsTorn(file: string): boolean {
  const size = fileSize(file);
  if (size === 0) return false;
  const fd = openSync(file, 'r');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, size - 1);
    return b[0] !== 0x0a;
  } finally {
    closeSync(fd);
  }
}

export function fileSize(file: string): number {
  try {
    return statSync(file).size;
  } catch {
    return 0;
  }
}

function parseLine(line: string): LogEntry | undefined {
  try {
    const o = JSON.parse(line) as { t?: unknown; s?: unknown; d?: unknown };
    if (typeof o.t !== 'number' || (o.s !== 'stdout' && o.s !== 'stderr') || typeof o.d !== 'string') return undefined;
    return { timeMs: o.t, stream: o.s, data: o.d };
  } catch {
    return undefined; // a torn last line after a crash
  }
}
