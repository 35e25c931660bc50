/**
 * An instance's output, kept on the host as NDJSON (one line per output line: time, stream,
 * base64 data, and the exec id for exec output), so it survives the VM, the daemon, and a
 * stopped instance.
 *
 * Bounded twice over: the workload's output (`output.ndjson`) and the execs' (`execs.ndjson`)
 * each rotate to `<file>.1` past `maxFileBytes` (one generation kept), so an exec that prints
 * gigabytes can never evict the workload's own first lines, and an instance holds at most
 * about 4 × maxFileBytes.
 *
 * Never blocks the daemon: appends are queued and written in batches with asynchronous I/O.
 * An entry is announced (`entry`) only once it is on disk, so a follower that reads the files
 * up to `sizes()` and then takes live entries sees every entry exactly once. The queue is
 * bounded: past `HIGH_WATER_BYTES` the store reports itself congested, and its producer (the
 * agent channel) pauses until `drain`, which pushes back to the guest. A write that fails (a
 * full disk) drops that batch, counts it, and says so once; the daemon stays up.
 */
import { EventEmitter } from 'node:events';
import { closeSync, createReadStream, openSync, promises as fs, readSync, statSync } from 'node:fs';
import readline from 'node:readline';
import type { Stream } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';

type LogEvent = ApiSchemas['LogEvent'];
/** One stored output entry: a log stream's `output` event (spec/openapi.json's LogEvent) without its type. */
export type LogEntry = Omit<Extract<LogEvent, { type: 'output' }>, 'type'>;
/** How the instance ended: a log stream's `end` event without its type. */
export type LogEnd = Omit<Extract<LogEvent, { type: 'end' }>, 'type'>;

export interface LogFilter {
  /** Only entries at or after this time. */
  sinceMs?: number;
  /** Include exec output (by default only the workload's). */
  execs?: boolean;
}

/** How far each file was written: what a follower reads before switching to live entries. */
export interface LogSizes {
  workload: number;
  execs: number;
}

/** Per-file bound before rotation: 8 MiB, so at most ~32 MiB of output per instance. */
export const DEFAULT_MAX_LOG_BYTES = 8 * 1024 * 1024;
/** Lines of one output chunk stored as entries of their own; the rest of the chunk is one. */
const MAX_ENTRIES_PER_CHUNK = 64;
/** Queued bytes past which the producer is asked to pause. */
const HIGH_WATER_BYTES = 4 * 1024 * 1024;

/** One bounded, rotated NDJSON file with a write queue. */
class LogFile {
  private queue: { line: string; entry: LogEntry }[] = [];
  queuedBytes = 0;
  private size = -1;
  private checkedTail = false;
  private writing: Promise<void> | undefined;
  droppedBytes = 0;

  constructor(
    readonly file: string,
    private readonly maxFileBytes: number,
    private readonly written: (entries: LogEntry[]) => void,
    private readonly failed: (err: Error) => void,
  ) {}

  get rotatedFile(): string {
    return `${this.file}.1`;
  }

  /**
   * How much of the file holds entries already announced: what a follower reads from disk
   * before it takes live entries. Not the file's size on disk: an append that has landed
   * there is announced a moment later (its callback still queued), and would then be seen
   * twice, once from the file and once live.
   */
  announcedSize(): number {
    return this.size >= 0 ? this.size : fileSize(this.file);
  }

  push(entry: LogEntry): void {
    const line =
      JSON.stringify({ t: entry.timeMs, s: entry.stream, d: entry.data, ...(entry.execId !== undefined ? { x: entry.execId } : {}) }) +
      '\n';
    this.queue.push({ line, entry });
    this.queuedBytes += line.length;
    this.writing ??= this.flush();
  }

  /** Resolves once everything queued so far is on disk (or dropped). */
  async settled(): Promise<void> {
    while (this.writing) await this.writing;
  }

  private async flush(): Promise<void> {
    // Let a burst of output gather into one write.
    await new Promise((r) => setImmediate(r));
    while (this.queue.length > 0) {
      const batch = this.queue;
      this.queue = [];
      // Written in runs that each fit the current file, rotating between them.
      let i = 0;
      while (i < batch.length) {
        const run: { line: string; entry: LogEntry }[] = [];
        let bytes = 0;
        try {
          if (this.size < 0) this.size = fileSize(this.file);
          // A crash may have left a torn last line; start ours on a fresh one so it is not lost too.
          const sep = this.checkedTail ? '' : endsTorn(this.file) ? '\n' : '';
          this.checkedTail = true;
          const first = batch[i];
          if (first && this.size > 0 && this.size + sep.length + first.line.length > this.maxFileBytes) {
            await fs.rename(this.file, this.rotatedFile);
            this.size = 0;
          }
          for (; i < batch.length; i++) {
            const b = batch[i];
            if (!b) break;
            if (run.length > 0 && this.size + sep.length + bytes + b.line.length > this.maxFileBytes) break;
            run.push(b);
            bytes += b.line.length;
          }
          const text = sep + run.map((b) => b.line).join('');
          await fs.appendFile(this.file, text, { mode: 0o600 });
          this.size += Buffer.byteLength(text);
          this.queuedBytes -= bytes;
          this.written(run.map((b) => b.entry));
        } catch (err) {
          // What this run held is lost; the rest of the batch is tried (the disk may have room again).
          const lost = run.length > 0 ? bytes : (batch[i]?.line.length ?? 0);
          if (run.length === 0) i++;
          this.queuedBytes -= lost;
          this.droppedBytes += lost;
          this.failed(err as Error);
        }
      }
    }
    this.writing = undefined;
  }
}

export class LogStore extends EventEmitter<{ entry: [LogEntry]; end: [LogEnd]; exit: [LogEnd]; drain: [] }> {
  private ended: LogEnd | undefined;
  private exited: LogEnd | undefined;
  private readonly workload: LogFile;
  private readonly execs: LogFile;
  private warnedFailure = false;
  private wasCongested = false;

  constructor(
    /** The workload's file; exec output goes beside it in `execs.ndjson`. */
    readonly file: string,
    maxFileBytes = DEFAULT_MAX_LOG_BYTES,
    /** Told once when writing fails (a full disk): the daemon logs it. */
    private readonly onFailure: (message: string) => void = () => undefined,
  ) {
    super();
    this.setMaxListeners(0);
    const written = (entries: LogEntry[]): void => {
      for (const e of entries) this.emit('entry', e);
      this.checkDrained();
    };
    const failed = (err: Error): void => {
      if (!this.warnedFailure) this.onFailure(`output not stored (${err.message}); later output may be dropped too`);
      this.warnedFailure = true;
      this.checkDrained();
    };
    this.workload = new LogFile(file, maxFileBytes, written, failed);
    const execsFile = file.endsWith('output.ndjson') ? file.replace(/output\.ndjson$/, 'execs.ndjson') : `${file}.execs`;
    this.execs = new LogFile(execsFile, maxFileBytes, written, failed);
  }

  get rotatedFile(): string {
    return this.workload.rotatedFile;
  }

  get execsFile(): string {
    return this.execs.file;
  }

  /** Bytes dropped because they could not be written. */
  get droppedBytes(): number {
    return this.workload.droppedBytes + this.execs.droppedBytes;
  }

  /** More is queued than should be: the producer should pause until `drain`. */
  get congested(): boolean {
    return this.workload.queuedBytes + this.execs.queuedBytes > HIGH_WATER_BYTES;
  }

  private checkDrained(): void {
    if (this.wasCongested && !this.congested) {
      this.wasCongested = false;
      this.emit('drain');
    }
  }

  /**
   * Stores a chunk of output, one entry per line (the last may be a partial line), so that
   * `tail` counts lines as `docker logs --tail` does. Returns false when the store is congested.
   */
  append(stream: Stream, data: Buffer, execId?: string): boolean {
    const target = execId === undefined ? this.workload : this.execs;
    const timeMs = Date.now();
    let start = 0;
    let entries = 0;
    while (start < data.length) {
      const nl = data.indexOf(0x0a, start);
      // A chunk of thousands of tiny lines (`yes ''`) would cost an entry each: past
      // MAX_ENTRIES_PER_CHUNK the rest of the chunk is one entry (tail then counts it once).
      const end = nl === -1 || entries === MAX_ENTRIES_PER_CHUNK - 1 ? data.length : nl + 1;
      const entry: LogEntry = { timeMs, stream, data: data.subarray(start, end).toString('base64') };
      if (execId !== undefined) entry.execId = execId;
      target.push(entry);
      entries++;
      start = end;
    }
    if (this.congested) this.wasCongested = true;
    return !this.wasCongested;
  }

  /** Resolves once every entry appended so far is on disk. */
  async settled(): Promise<void> {
    await Promise.all([this.workload.settled(), this.execs.settled()]);
  }

  end(info: LogEnd): void {
    if (this.ended) return;
    this.ended = info;
    // Followers get `end` after the last entry.
    void this.settled().then(() => this.emit('end', info));
  }

  get endInfo(): LogEnd | undefined {
    return this.ended;
  }

  /**
   * The workload exited: its status is known and its output is all here (the guest sends
   * `exit` after the last output), while the VM may still be powering off. `run` ends here.
   */
  workloadExited(info: LogEnd): void {
    if (this.exited) return;
    this.exited = info;
    void this.settled().then(() => this.emit('exit', info));
  }

  /** The workload's exit, or else the VM's end, once known. */
  get exitInfo(): LogEnd | undefined {
    return this.exited ?? this.ended;
  }

  /** How far each file is written now (read up to here, then follow `entry`). */
  sizes(): LogSizes {
    return { workload: this.workload.announcedSize(), execs: this.execs.announcedSize() };
  }

  /**
   * Stored entries, oldest first (rotated files, then the current ones up to `upto`, default:
   * their size now), the workload's and the execs' merged by time; `tail` keeps only the last
   * N that pass `filter`.
   */
  async *read(tail?: number, upto?: LogSizes, filter: LogFilter = {}): AsyncGenerator<LogEntry> {
    const sizes = upto ?? this.sizes();
    const workload = readFiles([
      [this.workload.rotatedFile, fileSize(this.workload.rotatedFile)],
      [this.workload.file, sizes.workload],
    ]);
    const execs = filter.execs
      ? readFiles([
          [this.execs.rotatedFile, fileSize(this.execs.rotatedFile)],
          [this.execs.file, sizes.execs],
        ])
      : undefined;
    const ring: LogEntry[] = [];
    for await (const entry of execs ? mergeByTime(workload, execs) : workload) {
      if (!matches(entry, filter)) continue;
      if (tail === undefined) yield entry;
      else {
        ring.push(entry);
        if (ring.length > tail) ring.shift();
      }
    }
    yield* ring;
  }
}

async function* readFiles(sources: [string, number][]): AsyncGenerator<LogEntry> {
  for (const [file, size] of sources) {
    if (size === 0) continue;
    const rl = readline.createInterface({ input: createReadStream(file, { end: size - 1 }), crlfDelay: Infinity });
    for await (const line of rl) {
      const entry = parseLine(line);
      if (entry) yield entry;
    }
  }
}

/** Two time-ordered entry streams as one (ties: the first stream first). */
async function* mergeByTime(a: AsyncGenerator<LogEntry>, b: AsyncGenerator<LogEntry>): AsyncGenerator<LogEntry> {
  let x = await a.next();
  let y = await b.next();
  while (!x.done || !y.done) {
    if (y.done || (!x.done && x.value.timeMs <= y.value.timeMs)) {
      yield x.value as LogEntry;
      x = await a.next();
    } else {
      yield y.value;
      y = await b.next();
    }
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
