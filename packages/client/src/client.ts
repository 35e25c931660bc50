/**
 * Typed client of the aegisd API over its unix socket. The CLI and the tests use it; so can
 * anyone embedding Aegis. Errors arrive as AegisError with the daemon's code unchanged.
 */
import http from 'node:http';
import type { Readable } from 'node:stream';
import os from 'node:os';
import path from 'node:path';
import { AegisError, LineDecoder } from '@aegis/protocol';
import type {
  CreateInstanceRequest,
  EgressPolicy,
  EgressView,
  ExecEvent,
  ExecRequest,
  FileStat,
  ForkRequest,
  ForkResult,
  Image,
  Instance,
  InstanceStats,
  LifecycleEvent,
  LogEvent,
  ProcessInfo,
  PullEvent,
  RunEvent,
  SecretMeta,
  SnapshotView,
  Status,
  Volume,
  WaitResult,
} from '@aegis/protocol/api';

export function defaultSocketPath(env: NodeJS.ProcessEnv = process.env): string {
  return path.join(env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis'), 'aegisd.sock');
}

interface RequestOptions {
  method: string;
  path: string;
  body?: unknown;
  /** Bytes instead of a JSON body (streamed; a Buffer or a known `length` sets Content-Length). */
  raw?: { data: Readable | Buffer; contentType: string; length?: number };
  signal?: AbortSignal;
}

/** A guest path as the files API's `path` query parameter. */
const pathQuery = (p: string, extra: Record<string, string> = {}): string => new URLSearchParams({ path: p, ...extra }).toString();

export class AegisClient {
  constructor(readonly socketPath: string = defaultSocketPath()) {}

  private open(opts: RequestOptions): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      const payload = opts.body === undefined ? undefined : JSON.stringify(opts.body);
      const raw = opts.raw;
      const length = raw ? (Buffer.isBuffer(raw.data) ? raw.data.length : raw.length) : undefined;
      const headers: Record<string, string | number> = raw
        ? { 'content-type': raw.contentType, ...(length !== undefined ? { 'content-length': length } : {}) }
        : payload === undefined
          ? {}
          : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) };
      const req = http.request({
        socketPath: this.socketPath,
        method: opts.method,
        path: opts.path,
        headers,
        ...(opts.signal ? { signal: opts.signal } : {}),
      });
      req.once('response', resolve);
      req.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code === 'ENOENT' || err.code === 'ECONNREFUSED') {
          reject(new AegisError('UNAVAILABLE', `aegisd is not running (no daemon at ${this.socketPath}); start it with: aegis up`));
        } else if (opts.signal?.aborted) {
          reject(cancelled(opts.signal));
        } else {
          reject(new AegisError('UNAVAILABLE', `cannot reach aegisd at ${this.socketPath}: ${err.message}`));
        }
      });
      if (raw && !Buffer.isBuffer(raw.data)) {
        raw.data.once('error', (err) => req.destroy(err));
        raw.data.pipe(req);
      } else req.end(raw ? raw.data : payload);
    });
  }

  /**
   * A response that is not an error: one (an HTTP status of 400 or more) is read and thrown
   * as the daemon's AegisError before the caller reads anything.
   */
  private async success(opts: RequestOptions): Promise<http.IncomingMessage> {
    const res = await this.open(opts);
    const status = res.statusCode ?? 500;
    if (status < 400) return res;
    const chunks: Buffer[] = [];
    for await (const c of res as AsyncIterable<Buffer>) chunks.push(c);
    throw errorFromBody(Buffer.concat(chunks).toString('utf8'), status);
  }

  private async call<T>(opts: RequestOptions): Promise<T> {
    const res = await this.success(opts);
    const chunks: Buffer[] = [];
    try {
      for await (const c of res as AsyncIterable<Buffer>) chunks.push(c);
    } catch (err) {
      if (opts.signal?.aborted) throw cancelled(opts.signal);
      throw new AegisError('UNAVAILABLE', `answer from aegisd broke: ${(err as Error).message}`);
    }
    const text = Buffer.concat(chunks).toString('utf8');
    return (text === '' ? undefined : JSON.parse(text)) as T;
  }

  /** An NDJSON stream; a final `{type:"error"}` event is thrown as an AegisError. */
  private async *stream<T>(opts: RequestOptions): AsyncGenerator<T> {
    const res = await this.success(opts);
    const decoder = new LineDecoder();
    try {
      for await (const chunk of res as AsyncIterable<Buffer>) {
        for (const line of decoder.push(chunk).lines) {
          if (line === '') continue;
          const ev = JSON.parse(line) as { type?: string };
          if (ev.type === 'error') throw AegisError.fromWire(ev);
          yield ev as T;
        }
      }
    } catch (err) {
      if (err instanceof AegisError) throw err;
      if (opts.signal?.aborted) throw cancelled(opts.signal);
      throw new AegisError('UNAVAILABLE', `stream from aegisd broke: ${(err as Error).message}`);
    }
  }

  status(): Promise<Status> {
    return this.call({ method: 'GET', path: '/v1/status' });
  }

  shutdown(): Promise<void> {
    return this.call({ method: 'POST', path: '/v1/shutdown' });
  }

  createInstance(req: CreateInstanceRequest, signal?: AbortSignal): Promise<Instance> {
    return this.call({ method: 'POST', path: '/v1/instances', body: req, ...(signal ? { signal } : {}) });
  }

  /** `labels`: `k` (has the label) or `k=v`; all must hold. */
  async listInstances(options: { all?: boolean; labels?: string[] } = {}): Promise<Instance[]> {
    const q = new URLSearchParams();
    if (options.all) q.set('all', 'true');
    for (const l of options.labels ?? []) q.append('label', l);
    const qs = q.toString();
    const r = await this.call<{ instances: Instance[] }>({ method: 'GET', path: `/v1/instances${qs ? `?${qs}` : ''}` });
    return r.instances;
  }

  getInstance(ref: string): Promise<Instance> {
    return this.call({ method: 'GET', path: `/v1/instances/${encodeURIComponent(ref)}` });
  }

  stopInstance(ref: string, options: { timeoutMs?: number } = {}): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/stop`, body: options });
  }

  deleteInstance(ref: string, options: { force?: boolean } = {}): Promise<void> {
    return this.call({ method: 'DELETE', path: `/v1/instances/${encodeURIComponent(ref)}${options.force ? '?force=true' : ''}` });
  }

  pauseInstance(ref: string): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/pause` });
  }

  /** Saves the machine to disk and ends its VMM; any use (or `resumeInstance`) wakes it where it was. */
  hibernateInstance(ref: string): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/hibernate` });
  }

  resumeInstance(ref: string): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/resume` });
  }

  /** Stops the instance if it runs, then boots it again on its own disk (same command, ports, image). */
  restartInstance(ref: string): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/restart` });
  }

  signalInstance(ref: string, signal: string): Promise<void> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/signal`, body: { signal } });
  }

  signalExec(ref: string, execId: string, signal: string): Promise<void> {
    const p = `/v1/instances/${encodeURIComponent(ref)}/execs/${encodeURIComponent(execId)}/signal`;
    return this.call({ method: 'POST', path: p, body: { signal } });
  }

  resizeExec(ref: string, execId: string, size: { rows: number; cols: number }): Promise<void> {
    const p = `/v1/instances/${encodeURIComponent(ref)}/execs/${encodeURIComponent(execId)}/resize`;
    return this.call({ method: 'POST', path: p, body: size });
  }

  /** Writes to the workload's stdin (the instance must have been created with `stdin: true`). */
  instanceInput(ref: string, input: { data?: Buffer; eof?: boolean }): Promise<void> {
    const body = { ...(input.data ? { data: input.data.toString('base64') } : {}), ...(input.eof ? { eof: true } : {}) };
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/input`, body });
  }

  resizeInstance(ref: string, size: { rows: number; cols: number }): Promise<void> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/resize`, body: size });
  }

  /** Resolves when the instance is stopped or failed (docker wait). */
  waitInstance(ref: string, signal?: AbortSignal): Promise<WaitResult> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/wait`, ...(signal ? { signal } : {}) });
  }

  /** Gives a live instance a new deadline `timeoutMs` from now (0: none). */
  setDeadline(ref: string, timeoutMs: number): Promise<Instance> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/deadline`, body: { timeoutMs } });
  }

  /** Its egress policy, per-destination counters and (with `log`) its latest decisions. */
  instanceEgress(ref: string, log = false): Promise<EgressView> {
    return this.call({ method: 'GET', path: `/v1/instances/${encodeURIComponent(ref)}/egress${log ? '?log=1' : ''}` });
  }

  /** Adds egress rules to a running (or stopped) `user`-network instance; new connections follow them at once. */
  updateEgress(ref: string, change: EgressPolicy): Promise<EgressView> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/egress`, body: change });
  }

  /** What it uses now (docker stats). */
  instanceStats(ref: string): Promise<InstanceStats> {
    return this.call({ method: 'GET', path: `/v1/instances/${encodeURIComponent(ref)}/stats` });
  }

  /** The guest's processes (docker top). */
  topInstance(ref: string): Promise<{ processes: ProcessInfo[]; truncated?: boolean }> {
    return this.call({ method: 'GET', path: `/v1/instances/${encodeURIComponent(ref)}/top` });
  }

  /**
   * Creates an instance and streams its output until it ends. With `autoRemove`, the daemon
   * deletes it at the end, and also when this stream is dropped (an abort, a dead client).
   */
  run(req: CreateInstanceRequest, signal?: AbortSignal): AsyncGenerator<RunEvent> {
    return this.stream({ method: 'POST', path: '/v1/run', body: req, ...(signal ? { signal } : {}) });
  }

  /**
   * A file's bytes, streamed. The stream errors if the transfer is cut short (the response
   * carries the file's length).
   */
  async readFile(ref: string, guestPath: string, signal?: AbortSignal): Promise<{ mode: number; size: number; data: Readable }> {
    const res = await this.success({
      method: 'GET',
      path: `/v1/instances/${encodeURIComponent(ref)}/files?${pathQuery(guestPath)}`,
      ...(signal ? { signal } : {}),
    });
    return {
      mode: parseInt(String(res.headers['x-aegis-file-mode'] ?? '0'), 8),
      size: Number(res.headers['content-length'] ?? -1),
      data: res,
    };
  }

  /** Writes a file (replaced once all of it arrived). Give `length` with a stream when known: the guest checks it. */
  writeFile(
    ref: string,
    guestPath: string,
    data: Readable | Buffer | string,
    options: { mode?: number; length?: number; signal?: AbortSignal } = {},
  ): Promise<FileStat> {
    const body = typeof data === 'string' ? Buffer.from(data) : data;
    const q = pathQuery(guestPath, options.mode !== undefined ? { mode: options.mode.toString(8).padStart(4, '0') } : {});
    return this.call({
      method: 'PUT',
      path: `/v1/instances/${encodeURIComponent(ref)}/files?${q}`,
      raw: { data: body, contentType: 'application/octet-stream', ...(options.length !== undefined ? { length: options.length } : {}) },
      ...(options.signal ? { signal: options.signal } : {}),
    });
  }

  statFile(ref: string, guestPath: string): Promise<FileStat> {
    return this.call({ method: 'GET', path: `/v1/instances/${encodeURIComponent(ref)}/files/stat?${pathQuery(guestPath)}` });
  }

  async listFiles(ref: string, guestPath: string): Promise<FileStat[]> {
    const path = `/v1/instances/${encodeURIComponent(ref)}/files/list?${pathQuery(guestPath)}`;
    return (await this.call<{ entries: FileStat[] }>({ method: 'GET', path })).entries;
  }

  makeDirectory(ref: string, guestPath: string, options: { parents?: boolean; mode?: number } = {}): Promise<FileStat> {
    return this.call({
      method: 'POST',
      path: `/v1/instances/${encodeURIComponent(ref)}/files/mkdir`,
      body: { path: guestPath, ...options },
    });
  }

  removeFile(ref: string, guestPath: string, options: { recursive?: boolean } = {}): Promise<void> {
    const q = pathQuery(guestPath, options.recursive ? { recursive: 'true' } : {});
    return this.call({ method: 'DELETE', path: `/v1/instances/${encodeURIComponent(ref)}/files?${q}` });
  }

  /** A tar of a guest path (docker cp out) and what the path is. */
  async getArchive(ref: string, guestPath: string, signal?: AbortSignal): Promise<{ stat: FileStat; tar: Readable }> {
    const res = await this.success({
      method: 'GET',
      path: `/v1/instances/${encodeURIComponent(ref)}/archive?${pathQuery(guestPath)}`,
      ...(signal ? { signal } : {}),
    });
    const header = String(res.headers['x-aegis-path-stat'] ?? '');
    let stat: FileStat;
    try {
      stat = JSON.parse(Buffer.from(header, 'base64').toString('utf8')) as FileStat;
    } catch {
      res.destroy();
      throw new AegisError('INTERNAL', "aegisd sent an archive without the path's stat");
    }
    return { stat, tar: res };
  }

  /** Extracts a tar into the guest directory `guestDir` (docker cp in). */
  putArchive(
    ref: string,
    guestDir: string,
    tar: Readable | Buffer,
    options: { keepOwner?: boolean; signal?: AbortSignal } = {},
  ): Promise<FileStat> {
    const q = pathQuery(guestDir, options.keepOwner ? { keepOwner: 'true' } : {});
    return this.call({
      method: 'PUT',
      path: `/v1/instances/${encodeURIComponent(ref)}/archive?${q}`,
      raw: { data: tar, contentType: 'application/x-tar' },
      ...(options.signal ? { signal: options.signal } : {}),
    });
  }

  /** Writes to an exec's stdin (it must have been started with `stdin: true`). */
  execInput(ref: string, execId: string, input: { data?: Buffer; eof?: boolean }): Promise<void> {
    const p = `/v1/instances/${encodeURIComponent(ref)}/execs/${encodeURIComponent(execId)}/input`;
    const body = { ...(input.data ? { data: input.data.toString('base64') } : {}), ...(input.eof ? { eof: true } : {}) };
    return this.call({ method: 'POST', path: p, body });
  }

  /** `hosts`: broker it to these hosts only (the guest gets a placeholder); none: the value goes into environments. */
  setSecret(name: string, value: string, hosts: string[] = []): Promise<SecretMeta> {
    return this.call({
      method: 'PUT',
      path: `/v1/secrets/${encodeURIComponent(name)}`,
      body: hosts.length > 0 ? { value, hosts } : { value },
    });
  }

  async listSecrets(): Promise<SecretMeta[]> {
    return (await this.call<{ secrets: SecretMeta[] }>({ method: 'GET', path: '/v1/secrets' })).secrets;
  }

  deleteSecret(name: string): Promise<void> {
    return this.call({ method: 'DELETE', path: `/v1/secrets/${encodeURIComponent(name)}` });
  }

  async listImages(): Promise<Image[]> {
    return (await this.call<{ images: Image[] }>({ method: 'GET', path: '/v1/images' })).images;
  }

  getImage(ref: string): Promise<Image> {
    return this.call({ method: 'GET', path: `/v1/images/${encodeURIComponent(ref)}` });
  }

  /** Streams the pull's progress; an `error` event ends a pull that failed after it began. */
  pullImage(reference: string, signal?: AbortSignal): AsyncGenerator<PullEvent> {
    return this.stream({ method: 'POST', path: '/v1/images/pull', body: { reference }, ...(signal ? { signal } : {}) });
  }

  /** `path` must be readable by aegisd (the CLI passes an absolute path). */
  async importImage(path: string, reference?: string): Promise<Image[]> {
    const body = reference !== undefined ? { path, reference } : { path };
    return (await this.call<{ images: Image[] }>({ method: 'POST', path: '/v1/images/import', body })).images;
  }

  removeImage(ref: string): Promise<{ untagged: string[]; deleted?: string }> {
    return this.call({ method: 'DELETE', path: `/v1/images/${encodeURIComponent(ref)}` });
  }

  /**
   * Creates a named volume (`sizeMiB` default 1024, sparse). Like `docker volume create`, an
   * existing one is returned as it is, unless another size is asked (ALREADY_EXISTS).
   */
  createVolume(name: string, options: { sizeMiB?: number } = {}): Promise<Volume> {
    const body = options.sizeMiB !== undefined ? { name, sizeMiB: options.sizeMiB } : { name };
    return this.call({ method: 'POST', path: '/v1/volumes', body });
  }

  async listVolumes(): Promise<Volume[]> {
    return (await this.call<{ volumes: Volume[] }>({ method: 'GET', path: '/v1/volumes' })).volumes;
  }

  getVolume(name: string): Promise<Volume> {
    return this.call({ method: 'GET', path: `/v1/volumes/${encodeURIComponent(name)}` });
  }

  /** Removes the volume and its data; FAILED_PRECONDITION while any instance names it. */
  removeVolume(name: string): Promise<void> {
    return this.call({ method: 'DELETE', path: `/v1/volumes/${encodeURIComponent(name)}` });
  }

  /** Checkpoints a running instance (it carries on); start from it with `createInstance({ snapshot })`. */
  createSnapshot(ref: string, options: { name?: string; signal?: AbortSignal } = {}): Promise<SnapshotView> {
    return this.call({
      method: 'POST',
      path: `/v1/instances/${encodeURIComponent(ref)}/snapshots`,
      body: options.name !== undefined ? { name: options.name } : {},
      ...(options.signal ? { signal: options.signal } : {}),
    });
  }

  /** Checkpoints the instance and starts `count` instances from that point. */
  forkInstance(ref: string, options: ForkRequest & { signal?: AbortSignal } = {}): Promise<ForkResult> {
    const { signal, ...body } = options;
    return this.call({
      method: 'POST',
      path: `/v1/instances/${encodeURIComponent(ref)}/fork`,
      body,
      ...(signal ? { signal } : {}),
    });
  }

  async listSnapshots(): Promise<SnapshotView[]> {
    return (await this.call<{ snapshots: SnapshotView[] }>({ method: 'GET', path: '/v1/snapshots' })).snapshots;
  }

  getSnapshot(name: string): Promise<SnapshotView> {
    return this.call({ method: 'GET', path: `/v1/snapshots/${encodeURIComponent(name)}` });
  }

  /** FAILED_PRECONDITION while instances started from it exist. */
  deleteSnapshot(name: string): Promise<void> {
    return this.call({ method: 'DELETE', path: `/v1/snapshots/${encodeURIComponent(name)}` });
  }

  exec(ref: string, req: ExecRequest, signal?: AbortSignal): AsyncGenerator<ExecEvent> {
    return this.stream({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/exec`, body: req, ...(signal ? { signal } : {}) });
  }

  /** Starts a command in the background (docker exec -d): its output goes to the instance's log. */
  execDetached(ref: string, req: Omit<ExecRequest, 'detach' | 'stdin' | 'tty'>): Promise<{ execId: string }> {
    return this.call({ method: 'POST', path: `/v1/instances/${encodeURIComponent(ref)}/exec`, body: { ...req, detach: true } });
  }

  logs(
    ref: string,
    options: { follow?: boolean; tail?: number; sinceMs?: number; execs?: boolean; signal?: AbortSignal } = {},
  ): AsyncGenerator<LogEvent> {
    const q = new URLSearchParams();
    if (options.follow) q.set('follow', 'true');
    if (options.tail !== undefined) q.set('tail', String(options.tail));
    if (options.sinceMs !== undefined) q.set('since', String(Math.max(0, Math.floor(options.sinceMs))));
    if (options.execs) q.set('execs', 'true');
    const qs = q.toString();
    return this.stream({
      method: 'GET',
      path: `/v1/instances/${encodeURIComponent(ref)}/logs${qs ? `?${qs}` : ''}`,
      ...(options.signal ? { signal: options.signal } : {}),
    });
  }

  /** Lifecycle events (`aegis events`): stored ones from `sinceMs`/`afterSeq`, then live ones with `follow`. */
  events(options: EventsOptions = {}): AsyncGenerator<LifecycleEvent> {
    const q = new URLSearchParams();
    const ms = (n: number): string => String(Math.max(0, Math.floor(n)));
    if (options.sinceMs !== undefined) q.set('since', ms(options.sinceMs));
    if (options.untilMs !== undefined) q.set('until', ms(options.untilMs));
    if (options.afterSeq !== undefined) q.set('after', ms(options.afterSeq));
    if (options.follow) q.set('follow', 'true');
    for (const t of options.types ?? []) q.append('type', t);
    for (const i of options.instances ?? []) q.append('instance', i);
    for (const l of options.labels ?? []) q.append('label', l);
    const qs = q.toString();
    return this.stream({ method: 'GET', path: `/v1/events${qs ? `?${qs}` : ''}`, ...(options.signal ? { signal: options.signal } : {}) });
  }
}

/** Which events `events()` streams; filters of one kind match any of their values, kinds combine. */
export interface EventsOptions {
  /** Stored events from this time (ms since the epoch) first. */
  sinceMs?: number;
  /** Up to this time; a follow ends there. */
  untilMs?: number;
  /** After this sequence number (resuming). */
  afterSeq?: number;
  /** Keep streaming new events (until `untilMs`, or the signal). */
  follow?: boolean;
  types?: LifecycleEvent['type'][];
  /** Handles or ids. */
  instances?: string[];
  /** `k` or `k=v`. */
  labels?: string[];
  signal?: AbortSignal;
}

function errorFromBody(text: string, status: number): AegisError {
  try {
    return AegisError.fromWire(JSON.parse(text), `aegisd answered HTTP ${status}`);
  } catch {
    return new AegisError('UNKNOWN', `aegisd answered HTTP ${status}: ${text.slice(0, 200)}`);
  }
}

/** What an aborted call throws: TIMEOUT for `AbortSignal.timeout()`, CANCELLED otherwise. */
function cancelled(signal: AbortSignal): AegisError {
  const reason: unknown = signal.reason;
  if (reason instanceof AegisError) return reason;
  const timeout = reason instanceof Error && reason.name === 'TimeoutError';
  return new AegisError(timeout ? 'TIMEOUT' : 'CANCELLED', timeout ? 'the request timed out' : 'request cancelled');
}
