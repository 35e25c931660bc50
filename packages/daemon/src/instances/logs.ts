/**
 * An instance's output, kept on the host as NDJSON (one chunk per line: time, stream, base64
 * data, and the exec id for exec output), so it survives the VM, the daemon, and a stopped
 * instance. Bounded: past `maxFileBytes` the file is rotated to `<file>.1` (one generation is
 * kept), so an instance holds at most about twice that. Appends are synchronous: a follower
 * can read the file and then switch to live events with no gap and no duplicate.
 */
import { EventEmitter } from 'node:events';
import { appendFileSync, closeSync, createReadStream, openSync, readSync, renameSync, statSync } from 'node:fs';
import readline from 'node:readline';
import type { Stream } from '@aegis/protocol';

export interface LogEntry {
  timeMs: number;
  stream: Stream;
  /** base64 */
  data: string;
  /** Set for the output of an exec; absent for the workload's. */
  execId?: string;
}

export interface LogEnd {
  state: string;
  exitCode: number | null;
  stateReason?: string;
}

export interface LogFilter {
  /** Only entries at or after this time. */
  sinceMs?: number;
  /** Include exec output (by default only the workload's). */
  execs?: boolean;
}

/** Per-file bound before rotation: 8 MiB, so at most ~16 MiB of output per instance. */
export const DEFAULT_MAX_LOG_BYTES = 8 * 1024 * 1024;

export class LogStore extends EventEmitter<{ entry: [LogEntry]; end: [LogEnd] }> {
  private ended: LogEnd | undefined;
  private checkedTail = false;
  private size = -1;

  constructor(
    readonly file: string,
    private readonly maxFileBytes = DEFAULT_MAX_LOG_BYTES,
  ) {
    super();
    this.setMaxListeners(0);
  }

  get rotatedFile(): string {
    return `${this.file}.1`;
  }

  /**
   * Stores a chunk of output, one entry per line (the last may be a partial line), so that
   * `tail` counts lines as `docker logs --tail` does.
   */
  append(stream: Stream, data: Buffer, execId?: string): void {
    let start = 0;
    while (start < data.length) {
      const nl = data.indexOf(0x0a, start);
      const end = nl === -1 ? data.length : nl + 1;
      this.appendEntry(stream, data.subarray(start, end), execId);
      start = end;
    }
  }

  private appendEntry(stream: Stream, data: Buffer, execId: string | undefined): void {
    const entry: LogEntry = { timeMs: Date.now(), stream, data: data.toString('base64') };
    if (execId !== undefined) entry.execId = execId;
    if (this.size < 0) this.size = fileSize(this.file);
    // A crash may have left a torn last line; start ours on a fresh one so it is not lost too.
    const sep = this.checkedTail ? '' : endsTorn(this.file) ? '\n' : '';
    this.checkedTail = true;
    const line = sep + JSON.stringify({ t: entry.timeMs, s: stream, d: entry.data, ...(execId !== undefined ? { x: execId } : {}) }) + '\n';
    if (this.size > 0 && this.size + line.length > this.maxFileBytes) {
      renameSync(this.file, this.rotatedFile);
      this.size = 0;
    }
    appendFileSync(this.file, line, { mode: 0o600 });
    this.size += Buffer.byteLength(line);
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

  /**
   * Stored entries (lines), oldest first (the rotated file, then the current one up to `uptoBytes`,
   * default: its size now); `tail` keeps only the last N that pass `filter`.
   */
  async *read(tail?: number, uptoBytes?: number, filter: LogFilter = {}): AsyncGenerator<LogEntry> {
    const ring: LogEntry[] = [];
    const sources: [string, number][] = [
      [this.rotatedFile, fileSize(this.rotatedFile)],
      [this.file, uptoBytes ?? fileSize(this.file)],
    ];
    for (const [file, size] of sources) {
      if (size === 0) continue;
      const rl = readline.createInterface({ input: createReadStream(file, { end: size - 1 }), crlfDelay: Infinity });
      for await (const line of rl) {
        const entry = parseLine(line);
        if (!entry || !matches(entry, filter)) continue;
        if (tail === undefined) yield entry;
        else {
          ring.push(entry);
          if (ring.length > tail) ring.shift();
        }
      }
    }
    yield* ring;
  }
}

export function matches(e: LogEntry, filter: LogFilter): boolean {
  if (filter.sinceMs !== undefined && e.timeMs < filter.sinceMs) return false;
  if (e.execId !== undefined && !filter.execs) return false;
  return true;
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
    const o = JSON.parse(line) as { t?: unknown; s?: unknown; d?: unknown; x?: unknown };
    if (typeof o.t !== 'number' || (o.s !== 'stdout' && o.s !== 'stderr') || typeof o.d !== 'string') return undefined;
    const e: LogEntry = { timeMs: o.t, stream: o.s, data: o.d };
    if (typeof o.x === 'string') e.execId = o.x;
    return e;
  } catch {
    return undefined; // a torn last line after a crash
  }
}
