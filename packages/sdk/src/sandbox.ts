/**
 * A sandbox: one Aegis instance (a microVM) kept running for commands and files, as an E2B
 * sandbox is. Built on the typed client; everything here is a thin, decoded view of it.
 */
import { Readable } from 'node:stream';
import {
  AegisClient,
  defaultSocketPath,
  type ExecEvent,
  type FileStat,
  type Instance,
  type LifecycleEvent,
  type SnapshotView,
} from '@aegis/client';
import { CommandExitError, InvalidArgumentError, SandboxError, toSandboxError, wrap } from './errors.js';

export interface SandboxOptions {
  /** An OCI image reference (pulled when missing); default: Aegis's base Debian root. */
  image?: string;
  /** What keeps the sandbox alive (its workload); default `sleep infinity`. */
  command?: string[];
  env?: Record<string, string>;
  /** Names of stored secrets (`aegis secret set`) to put in the environment; `*` for all. */
  secrets?: string[];
  /** Guest ports reachable from the host (`getHost(port)`). */
  ports?: number[];
  /**
   * `user` (default): outbound TCP and DNS under the egress policy (public addresses only,
   * unless `egress` says otherwise); `none`: no network; `unfiltered`: every address the host
   * reaches, no policy.
   */
  network?: 'user' | 'none' | 'unfiltered';
  /**
   * Egress rules (network `user`): `allow` (any rule makes everything else denied) and `deny`
   * (wins); each a name (`pypi.org`), `*.suffix`, IP or CIDR with an optional `:PORT`.
   * Change them later with `sandbox.egress.allow()` / `.deny()`.
   */
  egress?: { allow?: string[]; deny?: string[] };
  memoryMiB?: number;
  vcpuCount?: number;
  /** A unique handle; default one is generated. */
  name?: string;
  /**
   * Its life, in ms: at the end the daemon stops and deletes it, whether or not this program
   * is still there (a crashed agent leaks nothing). 0: none. Default: 5 minutes (as E2B's);
   * `setTimeout` gives it more.
   */
  timeoutMs?: number;
  /**
   * Paused after this many ms unused (no command, output, file call or port traffic), at no CPU
   * cost; the next command, file call or connection wakes it first. 0: never. Default: the daemon's.
   */
  idlePauseMs?: number;
  /**
   * Hibernated (memory to disk, no VM) after this many ms unused, counted as `idlePauseMs` is
   * (and longer than it, when both are given); the next command, file call or connection wakes
   * it where it was. 0: never (default).
   */
  idleHibernateMs?: number;
  /** Key/value tags, to find it again (`aegis ps --filter label=k=v`). */
  labels?: Record<string, string>;
  /**
   * Host directories (`bind`, an existing absolute path) and named volumes (`volume`, made when
   * missing) mounted at `target` before the sandbox starts, as `docker -v`.
   */
  volumes?: { type: 'bind' | 'volume'; source: string; target: string; readOnly?: boolean }[];
  /**
   * Resume this snapshot (`sandbox.snapshot()`) instead of starting afresh: its processes carry
   * on, with a new identity, disk and ports. Its machine is the snapshot's, so `image`,
   * `command`, `env`, `secrets`, `network`, `memoryMiB`, `vcpuCount` and `volumes` cannot be given.
   */
  snapshot?: string;
  /** The daemon's socket; default `$AEGIS_HOME/aegisd.sock` (`~/.aegis/aegisd.sock`). */
  socketPath?: string;
  signal?: AbortSignal;
}

/** A checkpoint of a sandbox (`sandbox.snapshot()`): start it again with `Sandbox.create({ snapshot })`. */
export interface SnapshotInfo {
  name: string;
  createdAt: Date;
  /** The sandbox it was taken of. */
  source: { id: string; name: string };
  memoryMiB: number;
  /** Space it takes on the host. */
  sizeBytes: number;
  /** Names of sandboxes started from it (it cannot be deleted while there are any). */
  dependents: string[];
}

function snapshotInfo(v: SnapshotView): SnapshotInfo {
  return {
    name: v.name,
    createdAt: new Date(v.createdAt),
    source: { id: v.source.id, name: v.source.handle },
    memoryMiB: v.memoryMiB,
    sizeBytes: v.sizeBytes,
    dependents: v.dependents,
  };
}

/** A sandbox's life when `timeoutMs` is not given (E2B's default). */
export const DEFAULT_SANDBOX_TIMEOUT_MS = 5 * 60_000;

const SANDBOX_OPTIONS = [
  'image',
  'command',
  'env',
  'secrets',
  'ports',
  'network',
  'egress',
  'memoryMiB',
  'vcpuCount',
  'name',
  'timeoutMs',
  'idlePauseMs',
  'idleHibernateMs',
  'labels',
  'volumes',
  'snapshot',
  'socketPath',
  'signal',
];
/** Names E2B users (and plain-JS callers) reach for, and ours. */
const SANDBOX_HINTS: Record<string, string> = {
  envs: 'env',
  metadata: 'labels',
  template: 'image',
  timeout: 'timeoutMs',
  memory: 'memoryMiB',
  cpus: 'vcpuCount',
  cpuCount: 'vcpuCount',
};
const COMMAND_OPTIONS = ['env', 'cwd', 'user', 'stdin', 'onStdout', 'onStderr', 'signal', 'timeoutMs', 'throwOnError'];
const COMMAND_HINTS: Record<string, string> = {
  envs: 'env',
  background: 'commands.start() (it returns at once with a handle)',
  timeout: 'timeoutMs',
  workdir: 'cwd',
};

/**
 * Plain JavaScript passes any object: an option we do not know is an error naming the right
 * one, not silently ignored (`background: true` used to block until the command ended).
 */
function checkOptions(where: string, options: object, known: readonly string[], hints: Record<string, string>): void {
  if (typeof options !== 'object' || options === null) {
    throw new InvalidArgumentError(
      'INVALID_ARGUMENT',
      `${where}: options must be an object${typeof options === 'string' ? ` (for an image, pass { image: ${JSON.stringify(options)} })` : ''}`,
    );
  }
  for (const key of Object.keys(options)) {
    if (known.includes(key)) continue;
    const hint = hints[key];
    throw new InvalidArgumentError(
      'INVALID_ARGUMENT',
      `${where}: unknown option "${key}"${hint ? `; use ${hint}` : ` (known: ${known.join(', ')})`}`,
    );
  }
}

export interface CommandOptions {
  env?: Record<string, string>;
  /** Working directory (created when missing). */
  cwd?: string;
  /** `name`, `uid` or `uid:gid`. */
  user?: string;
  /** Written to the command's stdin, which is then closed. */
  stdin?: string | Uint8Array;
  onStdout?: (text: string) => void;
  onStderr?: (text: string) => void;
  /** Ends the command (its whole process group) when it fires; the call rejects with CancelledError or TimeoutError. */
  signal?: AbortSignal;
  /** Kills the command after this long; the call then rejects with TimeoutError. */
  timeoutMs?: number;
  /**
   * A non-zero exit rejects with CommandExitError (carrying the whole result), as E2B's
   * `commands.run` does; default false: it is a result like any other.
   */
  throwOnError?: boolean;
}

export interface CommandResult {
  /** The exit status; 128 + N when killed by signal N (as a shell reports it). */
  exitCode: number;
  /** The signal that killed it, if one did. */
  signal: string | null;
  stdout: string;
  stderr: string;
}

export interface FileInfo {
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'other';
  size: number;
  mode: number;
  uid: number;
  gid: number;
  modifiedAt: Date;
  linkTarget?: string;
}

/** A running command (`commands.start`). */
export interface CommandHandle {
  readonly id: string;
  /** Resolves when it exits. */
  wait(): Promise<CommandResult>;
  /** Sends a signal to the command (default SIGKILL). */
  kill(signal?: string): Promise<void>;
}

const SIGNALS: Record<string, number> = { SIGHUP: 1, SIGINT: 2, SIGQUIT: 3, SIGKILL: 9, SIGTERM: 15, SIGPIPE: 13, SIGABRT: 6, SIGSEGV: 11 };

/** A string command runs under `sh -c`, as E2B's commands run in a shell; an array is argv. */
function argv(cmd: string | string[]): string[] {
  if (typeof cmd === 'string') return ['sh', '-c', cmd];
  if (cmd.length === 0) throw new SandboxError('INVALID_ARGUMENT', 'the command is empty');
  return cmd;
}

function signals(options: CommandOptions): AbortSignal | undefined {
  const list = [options.signal, options.timeoutMs !== undefined ? AbortSignal.timeout(options.timeoutMs) : undefined].filter(
    (s): s is AbortSignal => s !== undefined,
  );
  return list.length === 0 ? undefined : list.length === 1 ? list[0] : AbortSignal.any(list);
}

export class Commands {
  /** @internal */
  constructor(
    private readonly client: AegisClient,
    private readonly ref: string,
  ) {}

  /** Runs a command to its end; a non-zero exit is a result, not an error. */
  async run(cmd: string | string[], options: CommandOptions = {}): Promise<CommandResult> {
    return (await this.start(cmd, options)).wait();
  }

  /** Starts a command and returns at once; `wait()` for its result. */
  async start(cmd: string | string[], options: CommandOptions = {}): Promise<CommandHandle> {
    checkOptions('commands.run/start', options, COMMAND_OPTIONS, COMMAND_HINTS);
    const signal = signals(options);
    const events = this.client.exec(
      this.ref,
      {
        command: argv(cmd),
        ...(options.env ? { env: options.env } : {}),
        ...(options.cwd ? { workdir: options.cwd } : {}),
        ...(options.user ? { user: options.user } : {}),
        ...(options.stdin !== undefined ? { stdin: true } : {}),
      },
      signal,
    );
    const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
    const out = { stdout: '', stderr: '' };
    const iterator = events[Symbol.asyncIterator]();
    // The first event says it started (or the call fails here, as a start should). A command
    // that is not there ends as it would under `sh -c`: exit 127 with the reason on stderr, one
    // outcome whether it was given as a string or as argv (as the CLI's `run` and `exec`).
    let first: IteratorResult<ExecEvent>;
    try {
      first = await wrap(() => iterator.next());
    } catch (err) {
      const e = toSandboxError(err);
      if (e.code !== 'NOT_FOUND' || !e.message.startsWith('command not found')) throw e;
      const stderr = `${e.message}\n`;
      options.onStderr?.(stderr);
      const result: CommandResult = { exitCode: 127, signal: null, stdout: '', stderr };
      const ended = options.throwOnError ? Promise.reject(new CommandExitError(result)) : Promise.resolve(result);
      ended.catch(() => undefined); // observed through wait()
      return { id: '', wait: () => ended, kill: () => Promise.resolve() };
    }
    if (first.done || first.value.type !== 'started') throw new SandboxError('INTERNAL', 'aegisd ended the exec before it started');
    const id = first.value.execId;
    if (options.stdin !== undefined) {
      const data = typeof options.stdin === 'string' ? Buffer.from(options.stdin) : Buffer.from(options.stdin);
      await wrap(() => this.client.execInput(this.ref, id, { data, eof: true }));
    }
    const done = (async (): Promise<CommandResult> => {
      let exit: Extract<ExecEvent, { type: 'exit' }> | undefined;
      try {
        for (let r = await iterator.next(); !r.done; r = await iterator.next()) {
          const ev = r.value;
          if (ev.type === 'output') {
            const text = decoders[ev.stream].decode(Buffer.from(ev.data, 'base64'), { stream: true });
            out[ev.stream] += text;
            (ev.stream === 'stdout' ? options.onStdout : options.onStderr)?.(text);
          } else if (ev.type === 'exit') exit = ev;
        }
      } catch (err) {
        throw toSandboxError(err);
      }
      if (!exit) throw new SandboxError('UNAVAILABLE', 'the command ended without an exit status (its sandbox stopped)');
      for (const s of ['stdout', 'stderr'] as const) out[s] += decoders[s].decode();
      const code = exit.exitCode ?? 128 + (SIGNALS[exit.signal ?? ''] ?? 0);
      const result = { exitCode: code, signal: exit.signal, stdout: out.stdout, stderr: out.stderr };
      if (code !== 0 && options.throwOnError) throw new CommandExitError(result);
      return result;
    })();
    done.catch(() => undefined); // observed through wait()
    return {
      id,
      wait: () => done,
      kill: (sig = 'SIGKILL') => wrap(() => this.client.signalExec(this.ref, id, sig)),
    };
  }
}

export class Files {
  /** @internal */
  constructor(
    private readonly client: AegisClient,
    private readonly ref: string,
  ) {}

  /** A file's contents: text (UTF-8, the default) or bytes. */
  read(path: string, options?: { format?: 'text'; signal?: AbortSignal }): Promise<string>;
  read(path: string, options: { format: 'bytes'; signal?: AbortSignal }): Promise<Uint8Array>;
  async read(path: string, options: { format?: 'text' | 'bytes'; signal?: AbortSignal } = {}): Promise<string | Uint8Array> {
    return wrap(async () => {
      const { data } = await this.client.readFile(this.ref, path, options.signal);
      const chunks: Buffer[] = [];
      for await (const c of data as AsyncIterable<Buffer>) chunks.push(c);
      const all = Buffer.concat(chunks);
      return options.format === 'bytes' ? new Uint8Array(all.buffer, all.byteOffset, all.length) : all.toString('utf8');
    });
  }

  /**
   * Writes a file whole (it replaces the old one once every byte arrived), making its parent
   * directories first as E2B does. `data` may be a stream: any async iterable of bytes, a Node
   * Readable included.
   */
  async write(
    path: string,
    data: string | Uint8Array | AsyncIterable<Uint8Array>,
    options: { mode?: number; signal?: AbortSignal } = {},
  ): Promise<FileInfo> {
    const parent = path.replace(/\/+$/, '').replace(/\/[^/]*$/, '');
    if (parent !== '') await wrap(() => this.client.makeDirectory(this.ref, parent, { parents: true }));
    const body = typeof data === 'string' ? Buffer.from(data) : data instanceof Uint8Array ? Buffer.from(data) : Readable.from(data);
    return info(await wrap(() => this.client.writeFile(this.ref, path, body, options)));
  }

  async list(path: string): Promise<FileInfo[]> {
    return (await wrap(() => this.client.listFiles(this.ref, path))).map(info);
  }

  /** What is at `path` (a symlink itself, not its target). NotFoundError when nothing is. */
  async stat(path: string): Promise<FileInfo> {
    return info(await wrap(() => this.client.statFile(this.ref, path)));
  }

  async exists(path: string): Promise<boolean> {
    try {
      await this.client.statFile(this.ref, path);
      return true;
    } catch (err) {
      const e = toSandboxError(err);
      if (e.code === 'NOT_FOUND') return false;
      throw e;
    }
  }

  async makeDir(path: string, options: { mode?: number } = {}): Promise<FileInfo> {
    return info(await wrap(() => this.client.makeDirectory(this.ref, path, { parents: true, ...options })));
  }

  async remove(path: string, options: { recursive?: boolean } = {}): Promise<void> {
    await wrap(() => this.client.removeFile(this.ref, path, options));
  }
}

function info(s: FileStat): FileInfo {
  return {
    name: s.name,
    type: s.type,
    size: s.size,
    mode: s.mode,
    uid: s.uid,
    gid: s.gid,
    modifiedAt: new Date(s.mtimeMs),
    ...(s.linkTarget !== undefined ? { linkTarget: s.linkTarget } : {}),
  };
}

/** A sandbox's egress policy and what it did (`sandbox.egress.show()`). */
export interface EgressInfo {
  network: 'user' | 'none' | 'unfiltered';
  /** `default`: public addresses; `allow-list`: only what `allow` matches; `off`: no policy. */
  mode: 'default' | 'allow-list' | 'off';
  allow: string[];
  deny: string[];
  counters: Array<{ destination: string; allowed: number; denied: number; bytesOut: number; bytesIn: number }>;
  log?: Array<{
    timeMs: number;
    kind: 'dns' | 'connect';
    name?: string;
    address?: string;
    port?: number;
    allowed: boolean;
    reason: string;
    bytesOut?: number;
    bytesIn?: number;
  }>;
}

/** A sandbox's egress policy, changed while it runs ("install, then lock"). */
export class Egress {
  /** @internal */
  constructor(
    private readonly client: AegisClient,
    private readonly ref: string,
  ) {}

  /** The policy, per-destination counters and (with `log`) the latest decisions. */
  show(options: { log?: boolean } = {}): Promise<EgressInfo> {
    return wrap(() => this.client.instanceEgress(this.ref, options.log === true));
  }

  /** Allows these destinations from now on (the first allow rule makes everything else denied). */
  allow(...patterns: string[]): Promise<EgressInfo> {
    return wrap(() => this.client.updateEgress(this.ref, { allow: patterns }));
  }

  /** Denies these destinations from now on (wins over allow). */
  deny(...patterns: string[]): Promise<EgressInfo> {
    return wrap(() => this.client.updateEgress(this.ref, { deny: patterns }));
  }
}

/** A sandbox's state (the daemon's instance states). */
export type SandboxState = 'starting' | 'running' | 'paused' | 'stopping' | 'stopped' | 'failed' | 'hibernated';

/**
 * A lifecycle event, as `aegis events` shows it (the daemon's `LifecycleEvent`, written out here:
 * the SDK's declarations name only its own types; eventStream checks the two agree).
 */
export interface SandboxEvent {
  /** Increases by one per event the daemon recorded. */
  seq: number;
  /** When it happened (ms since the epoch). */
  timeMs: number;
  type:
    | 'create'
    | 'start'
    | 'exit'
    | 'stop'
    | 'fail'
    | 'pause'
    | 'resume'
    | 'hibernate'
    | 'restore'
    | 'snapshot'
    | 'fork'
    | 'delete'
    | 'deadline'
    | 'egress-denied';
  instanceId?: string;
  handle?: string;
  labels?: Record<string, string>;
  /** Its state after the change. */
  state?: SandboxState;
  previousState?: SandboxState;
  exitCode?: number | null;
  reason?: string;
  /** snapshot, fork: the checkpoint's name. */
  snapshot?: string;
  /** fork: the new sandboxes' names. */
  forks?: string[];
  /** egress-denied: the name or address:port refused. */
  destination?: string;
  /** egress-denied: refusals since the last one reported, not reported one by one. */
  suppressed?: number;
}

export interface EventOptions {
  /** Stored events from then first (a Date, or ms since the epoch); without it, only new ones. */
  since?: Date | number;
  /** Keep waiting for new events (default true); false: only what is stored, then the iteration ends. */
  follow?: boolean;
  types?: SandboxEvent['type'][];
  /** `k` or `k=v`: only sandboxes with that label. */
  labels?: string[];
  /** Ends the iteration (a `for await` may also just `break`). */
  signal?: AbortSignal;
}

/** The daemon's events as an async iterable, errors as SandboxErrors. */
async function* eventStream(client: AegisClient, options: EventOptions, instances?: string[]): AsyncGenerator<SandboxEvent> {
  const since = options.since instanceof Date ? options.since.getTime() : options.since;
  const follow = options.follow ?? true;
  if (!follow && since === undefined) return;
  // Typed as the daemon's events and yielded as SandboxEvents: the compiler holds the two together.
  const stream: AsyncIterable<LifecycleEvent> = client.events({
    follow,
    ...(since !== undefined ? { sinceMs: since } : {}),
    ...(options.types ? { types: options.types } : {}),
    ...(options.labels ? { labels: options.labels } : {}),
    ...(instances ? { instances } : {}),
    ...(options.signal ? { signal: options.signal } : {}),
  });
  try {
    for await (const ev of stream) {
      const out: SandboxEvent = ev;
      yield out;
    }
  } catch (err) {
    if (options.signal?.aborted) return;
    throw toSandboxError(err);
  }
}

/** Every sandbox's lifecycle events (`aegis events`): `for await (const ev of events()) …`. */
export function events(options: EventOptions & { socketPath?: string } = {}): AsyncGenerator<SandboxEvent> {
  return eventStream(new AegisClient(options.socketPath ?? defaultSocketPath()), options);
}

export class Sandbox {
  readonly commands: Commands;
  readonly files: Files;
  readonly egress: Egress;

  private constructor(
    private readonly client: AegisClient,
    private instance: Instance,
  ) {
    this.commands = new Commands(client, instance.id);
    this.files = new Files(client, instance.id);
    this.egress = new Egress(client, instance.id);
  }

  /** The instance id (stable; `name` is the handle). */
  get id(): string {
    return this.instance.id;
  }

  get name(): string {
    return this.instance.handle;
  }

  /** Starts a sandbox; resolves once its VM runs. */
  static async create(options: SandboxOptions = {}): Promise<Sandbox> {
    checkOptions('Sandbox.create', options, SANDBOX_OPTIONS, SANDBOX_HINTS);
    const client = new AegisClient(options.socketPath ?? defaultSocketPath());
    const instance = await wrap(() =>
      client.createInstance(
        {
          ...(options.snapshot !== undefined ? { snapshot: options.snapshot } : { command: options.command ?? ['sleep', 'infinity'] }),
          ...(options.snapshot !== undefined && options.command ? { command: options.command } : {}),
          ...(options.image !== undefined ? { image: options.image } : {}),
          ...(options.name !== undefined ? { handle: options.name } : {}),
          ...(options.env ? { env: options.env } : {}),
          ...(options.secrets ? { secrets: options.secrets } : {}),
          ...(options.ports ? { exposes: options.ports.map((guestPort) => ({ guestPort })) } : {}),
          ...(options.network ? { network: options.network } : {}),
          ...(options.egress ? { egress: { allow: options.egress.allow ?? [], deny: options.egress.deny ?? [] } } : {}),
          ...(options.memoryMiB !== undefined ? { memoryMiB: options.memoryMiB } : {}),
          ...(options.vcpuCount !== undefined ? { vcpuCount: options.vcpuCount } : {}),
          // A script that forgets kill() must not leak a VM forever: 5 minutes unless told.
          timeoutMs: options.timeoutMs ?? DEFAULT_SANDBOX_TIMEOUT_MS,
          ...(options.idlePauseMs !== undefined ? { idlePauseMs: options.idlePauseMs } : {}),
          ...(options.idleHibernateMs !== undefined ? { idleHibernateMs: options.idleHibernateMs } : {}),
          ...(options.labels ? { labels: options.labels } : {}),
          ...(options.volumes ? { volumes: options.volumes } : {}),
          // A sandbox whose creator went away before it started is removed by the daemon.
          autoRemove: true,
        },
        options.signal,
      ),
    );
    return new Sandbox(client, instance);
  }

  /** A sandbox that exists already, by id or name. */
  static async connect(ref: string, options: { socketPath?: string } = {}): Promise<Sandbox> {
    const client = new AegisClient(options.socketPath ?? defaultSocketPath());
    return new Sandbox(client, await wrap(() => client.getInstance(ref)));
  }

  /** `host:port` on which the guest's `port` is reachable (it must have been in `ports`). */
  getHost(port: number): string {
    const m = this.instance.ports.find((p) => p.guestPort === port);
    if (!m) throw new SandboxError('NOT_FOUND', `port ${port} is not exposed; create the sandbox with ports: [${port}]`);
    return `${m.hostIp.includes(':') ? `[${m.hostIp}]` : m.hostIp}:${m.hostPort}`;
  }

  /** When the daemon will stop and delete it, if it has a deadline. */
  get deadline(): Date | undefined {
    return this.instance.deadline !== undefined ? new Date(this.instance.deadline) : undefined;
  }

  /** A new life: `timeoutMs` from now (0: none). */
  async setTimeout(timeoutMs: number): Promise<void> {
    this.instance = await wrap(() => this.client.setDeadline(this.instance.id, timeoutMs));
  }

  /** Whether its VM still runs. */
  async isRunning(): Promise<boolean> {
    this.instance = await wrap(() => this.client.getInstance(this.instance.id));
    return this.instance.state === 'running';
  }

  /** Stops the VM and deletes the sandbox; a sandbox already gone is fine. */
  async kill(): Promise<void> {
    try {
      await this.client.deleteInstance(this.instance.id, { force: true });
    } catch (err) {
      const e = toSandboxError(err);
      if (e.code !== 'NOT_FOUND') throw e;
    }
  }

  /**
   * Checkpoints the sandbox (memory, processes, disk) while it keeps running (paused only for
   * the copy): `Sandbox.create({ snapshot: info.name })` starts it again, any number of times.
   */
  async snapshot(options: { name?: string; signal?: AbortSignal } = {}): Promise<SnapshotInfo> {
    return snapshotInfo(await wrap(() => this.client.createSnapshot(this.instance.id, options)));
  }

  /**
   * `count` copies of this sandbox as it is now, each carrying on from this point with its own
   * identity, disk and ports; this one carries on too. They live `timeoutMs` (default 5
   * minutes, as `create`) and are throwaway, as sandboxes are.
   */
  async fork(count = 1, options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<Sandbox[]> {
    const r = await wrap(() =>
      this.client.forkInstance(this.instance.id, {
        count,
        timeoutMs: options.timeoutMs ?? DEFAULT_SANDBOX_TIMEOUT_MS,
        autoRemove: true,
        ...(options.signal ? { signal: options.signal } : {}),
      }),
    );
    return r.instances.map((i) => new Sandbox(this.client, i));
  }

  /**
   * Saves the sandbox to disk and ends its VM: no memory, no process, its ports still bound.
   * The next command, file call or connection wakes it where it was (the caller waits), also
   * after the daemon or the host restarted.
   */
  async hibernate(): Promise<void> {
    this.instance = await wrap(() => this.client.hibernateInstance(this.instance.id));
  }

  /** This sandbox's lifecycle events (from `since`, then live ones unless `follow: false`). */
  events(options: EventOptions = {}): AsyncGenerator<SandboxEvent> {
    return eventStream(this.client, options, [this.instance.id]);
  }

  /** Snapshots kept by the daemon. */
  static async listSnapshots(options: { socketPath?: string } = {}): Promise<SnapshotInfo[]> {
    const client = new AegisClient(options.socketPath ?? defaultSocketPath());
    return (await wrap(() => client.listSnapshots())).map(snapshotInfo);
  }

  /** Deletes a snapshot; FailedPreconditionError while sandboxes started from it exist. */
  static async deleteSnapshot(name: string, options: { socketPath?: string } = {}): Promise<void> {
    const client = new AegisClient(options.socketPath ?? defaultSocketPath());
    await wrap(() => client.deleteSnapshot(name));
  }

  /** `await using sbx = await Sandbox.create()`: killed at the end of the block. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}
