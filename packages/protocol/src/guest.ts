/**
 * The guest <-> host contract: every method and notification on the agent channel, with
 * the parsers that check what arrives. This file is the whole contract; change it on purpose.
 *
 * Transport: newline-delimited JSON-RPC 2.0 over the VM's agent channel (virtio-serial on
 * QEMU, vsock on Firecracker and libkrun). The host is the client; the guest (the harness)
 * answers requests and sends notifications. Binary data travels base64-encoded.
 */
import { constants as osConstants } from 'node:os';
import { AegisError } from './errors.js';

export const GUEST_PROTOCOL_VERSION = 1;

export type Stream = 'stdout' | 'stderr';

// ---- host -> guest requests -------------------------------------------------------------

/** What `run` (the workload) and `exec` share: the process to start and how. */
export interface ProcessParams {
  /** argv; argv[0] is looked up on PATH. */
  command: string[];
  env: Record<string, string>;
  /** Created when missing, as Docker's `-w` does. */
  workdir?: string;
  /**
   * Who the process runs as (`name`, `uid`, `name:group`, `uid:gid`), resolved in the root it
   * runs in (the image's /etc/passwd, or ours). Default: the image's `User`, else root.
   */
  user?: string;
  /** Give the process a stdin pipe fed by `stdin` requests (otherwise /dev/null). */
  stdin?: boolean;
  /** Run on a new pseudo-terminal of this size; output then arrives as one stream, `stdout`. */
  tty?: TtySize;
  /** Run inside the instance's OCI image root (mounted by aegis-init), not the base root. */
  image?: ImageContext;
}

export type RunParams = ProcessParams;

/** How a process runs in the image: as its config's `User` (`name`, `uid`, `uid:gid`, `name:group`). */
export interface ImageContext {
  user?: string;
}
export interface RunResult {
  pid: number;
  startedAtMs: number;
}

export interface ExecParams extends ProcessParams {
  /** Chosen by the host; names the exec in `output` and `execExit`. */
  execId: string;
}

export interface TtySize {
  rows: number;
  cols: number;
}

export interface ResizeParams extends TtySize {
  /** Omitted: the workload. */
  execId?: string;
}
export interface ExecResult {
  pid: number;
}

export interface SignalParams {
  /** Omitted: the workload. */
  execId?: string;
  signal: string;
  /** To the process's whole group (what it started too), not the process alone. */
  group?: boolean;
}

export interface StdinParams {
  /** Omitted: the workload. */
  execId?: string;
  /** base64 */
  data?: string;
  /** Close the process's stdin after `data`. */
  eof?: boolean;
}

/** Makes a VM restored from a snapshot its own: clock, hostname, and a reseeded RNG. */
export interface FreshParams {
  timeMs: number;
  hostname: string;
  /** base64, at least 32 bytes, from the host's CSPRNG */
  entropy: string;
}

export type HealthParams = Record<string, never>;
export interface HealthResult {
  version: number;
  uptimeMs: number;
  workload: { pid: number; running: boolean } | null;
}

export type PsParams = Record<string, never>;
/** One guest process, as `docker top` shows it (from /proc). */
export interface ProcessInfo {
  pid: number;
  ppid: number;
  uid: number;
  /** /proc/PID/stat's state letter (R, S, D, Z, T...). */
  state: string;
  /** Resident memory. */
  rssKiB: number;
  /** User + system CPU time used so far. */
  cpuMs: number;
  /** Since the VM booted. */
  startedAfterBootMs: number;
  /** The command line, arguments joined by spaces (cut at MAX_PS_COMMAND characters). */
  command: string;
}
export interface PsResult {
  processes: ProcessInfo[];
  /** There were more than MAX_PS_PROCESSES: the list is cut. */
  truncated?: boolean;
}
export const MAX_PS_PROCESSES = 4096;

export type StatsParams = Record<string, never>;
/** The guest's own view of its resources (`aegis stats`), from /proc. */
export interface StatsResult {
  memTotalKiB: number;
  memAvailableKiB: number;
  processes: number;
}
export const MAX_PS_COMMAND = 4096;

export interface ShutdownParams {
  /** How long the workload gets after SIGTERM before SIGKILL. */
  timeoutMs?: number;
}
export type ShutdownResult = Record<string, never>;

export interface GuestMethods {
  run: { params: RunParams; result: RunResult };
  exec: { params: ExecParams; result: ExecResult };
  signal: { params: SignalParams; result: Record<string, never> };
  stdin: { params: StdinParams; result: Record<string, never> };
  resize: { params: ResizeParams; result: Record<string, never> };
  fresh: { params: FreshParams; result: Record<string, never> };
  health: { params: HealthParams; result: HealthResult };
  ps: { params: PsParams; result: PsResult };
  stats: { params: StatsParams; result: StatsResult };
  shutdown: { params: ShutdownParams; result: ShutdownResult };
}
export type GuestMethod = keyof GuestMethods;

// ---- guest -> host notifications ---------------------------------------------------------

export interface ReadyEvent {
  version: number;
}
export interface OutputEvent {
  /** Omitted: output of the workload. */
  execId?: string;
  stream: Stream;
  /** base64 */
  data: string;
}
export interface ExitEvent {
  exitCode: number | null;
  signal: string | null;
  /** Output bytes the process wrote, per stream, as the harness counted them. */
  bytes?: { stdout: number; stderr: number };
  /** The pipes were closed before EOF (a background child held them open): output may be cut. */
  truncated?: boolean;
}
export interface ExecExitEvent extends ExitEvent {
  execId: string;
  /** Guest-measured time from receiving `exec` to the process's exit (for benchmarks). */
  durationMs?: number;
}

export interface GuestEvents {
  ready: ReadyEvent;
  output: OutputEvent;
  exit: ExitEvent;
  execExit: ExecExitEvent;
}
export type GuestEvent = keyof GuestEvents;

// ---- parsers ----------------------------------------------------------------------------
// Everything from the guest is untrusted: the host parses each notification and result with
// these before use. The harness uses the same parsers on what the host asks.

type Obj = Record<string, unknown>;

function obj(v: unknown, what: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) {
    throw new AegisError('INVALID_ARGUMENT', `${what} must be an object`);
  }
  return v as Obj;
}
function onlyKeys(o: Obj, keys: readonly string[], what: string): void {
  for (const k of Object.keys(o)) {
    // The name is the guest's: quoted and cut short, so an error message stays one short line.
    if (!keys.includes(k)) throw new AegisError('INVALID_ARGUMENT', `${what}: unknown field ${JSON.stringify(k.slice(0, 64))}`);
  }
}
/** An object with only `keys` (each optional as far as this check goes). */
function strict(v: unknown, keys: readonly string[], what: string): Obj {
  const o = obj(v, what);
  onlyKeys(o, keys, what);
  return o;
}
function str(v: unknown, what: string, maxLength = 1 << 20): string {
  if (typeof v !== 'string') throw new AegisError('INVALID_ARGUMENT', `${what} must be a string`);
  if (v.length > maxLength) throw new AegisError('INVALID_ARGUMENT', `${what} must be a string of at most ${maxLength} characters`);
  return v;
}
function optStr(v: unknown, what: string, maxLength = 4096): string | undefined {
  return v === undefined ? undefined : str(v, what, maxLength);
}
function int(v: unknown, what: string, min = Number.MIN_SAFE_INTEGER, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) {
    throw new AegisError('INVALID_ARGUMENT', `${what} must be an integer`);
  }
  if (v < min || v > max) throw new AegisError('INVALID_ARGUMENT', `${what} must be between ${min} and ${max}`);
  return v;
}
function bool(v: unknown, what: string): boolean {
  if (typeof v !== 'boolean') throw new AegisError('INVALID_ARGUMENT', `${what} must be true or false`);
  return v;
}
function intOrNull(v: unknown, what: string, min?: number, max?: number): number | null {
  return v === null ? null : int(v, what, min, max);
}
function argv(v: unknown, what: string): string[] {
  if (!Array.isArray(v) || v.length === 0) {
    throw new AegisError('INVALID_ARGUMENT', `${what} must be a non-empty array of strings`);
  }
  return v.map((a, i) => str(a, `${what}[${i}]`));
}
function env(v: unknown, what: string): Record<string, string> {
  const o = obj(v, what);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(o)) out[k] = str(val, `${what}.${k}`);
  return out;
}
function stream(v: unknown): Stream {
  if (v !== 'stdout' && v !== 'stderr') throw new AegisError('INVALID_ARGUMENT', 'stream must be stdout or stderr');
  return v;
}

// What the guest may send: each value checked for type and size, no field the contract does not
// name. Limits are generous for the real harness and small enough that nothing a guest sends
// costs the host much to hold or to log.
const MAX_EXEC_ID = 128;
/** base64 of one output chunk (the harness sends pipe reads: ≤ 64 KiB each). */
const MAX_OUTPUT_BASE64 = 16 << 20;
/** On Linux pid_max is at most 2^22. */
const MAX_PID = 1 << 22;
/** A signal's name as Node reports it (SIGKILL, SIGRTMIN+3...): never more than this. */
const SIGNAL_NAME = /^SIG[A-Z0-9+-]{1,29}$/;

function signalName(v: unknown, what: string): string | null {
  if (v === null) return null;
  if (typeof v !== 'string' || !SIGNAL_NAME.test(v)) {
    throw new AegisError('INVALID_ARGUMENT', `${what} must be a signal name (SIG..., at most 32 characters) or null`);
  }
  return v;
}
/**
 * Canonical base64 (padded, as Buffer#toString('base64') writes it). Checked by a round trip:
 * native, ~10x faster than any character test in JS or a regular expression (and a pattern
 * with a repeated group overflows V8's backtracking stack on megabytes).
 */
function base64(v: unknown, what: string, maxLength: number): string {
  const s = str(v, what, maxLength);
  if (s.length % 4 !== 0 || Buffer.from(s, 'base64').toString('base64') !== s) {
    throw new AegisError('INVALID_ARGUMENT', `${what} must be base64`);
  }
  return s;
}
function pid(v: unknown): number {
  return int(v, 'pid', 1, MAX_PID);
}
/** Exactly `{}`: a result that carries nothing. */
function empty(v: unknown, what: string): Record<string, never> {
  strict(v, [], what);
  return {};
}
/** The fields `exit` and `execExit` share. */
function exitFields(o: Obj): ExitEvent {
  const ev: ExitEvent = { exitCode: intOrNull(o['exitCode'], 'exitCode', 0, 255), signal: signalName(o['signal'], 'signal') };
  if (o['bytes'] !== undefined) {
    const b = strict(o['bytes'], ['stdout', 'stderr'], 'bytes');
    ev.bytes = { stdout: int(b['stdout'], 'bytes.stdout', 0), stderr: int(b['stderr'], 'bytes.stderr', 0) };
  }
  if (o['truncated'] !== undefined) ev.truncated = bool(o['truncated'], 'truncated');
  return ev;
}

function imageContext(v: unknown): ImageContext {
  const o = obj(v, 'image');
  onlyKeys(o, ['user'], 'image');
  return o['user'] !== undefined ? { user: str(o['user'], 'user', 256) } : {};
}

function ttySize(v: unknown): TtySize {
  const o = obj(v, 'tty');
  const rows = int(o['rows'], 'rows');
  const cols = int(o['cols'], 'cols');
  if (rows < 1 || rows > 1000 || cols < 1 || cols > 1000)
    throw new AegisError('INVALID_ARGUMENT', 'tty size must be 1..1000 rows and columns');
  return { rows, cols };
}

const PROCESS_KEYS = ['command', 'env', 'workdir', 'user', 'stdin', 'tty', 'image'] as const;

function processParams(o: Obj): ProcessParams {
  const p: ProcessParams = { command: argv(o['command'], 'command'), env: env(o['env'] ?? {}, 'env') };
  const workdir = optStr(o['workdir'], 'workdir');
  if (workdir !== undefined) p.workdir = workdir;
  const user = optStr(o['user'], 'user', 256);
  if (user !== undefined) p.user = user;
  if (o['stdin'] === true) p.stdin = true;
  if (o['tty'] !== undefined) p.tty = ttySize(o['tty']);
  if (o['image'] !== undefined) p.image = imageContext(o['image']);
  return p;
}

export const parseParams: { [M in GuestMethod]: (v: unknown) => GuestMethods[M]['params'] } = {
  run(v) {
    const o = obj(v ?? {}, 'run params');
    onlyKeys(o, PROCESS_KEYS, 'run params');
    return processParams(o);
  },
  exec(v) {
    const o = obj(v ?? {}, 'exec params');
    onlyKeys(o, ['execId', ...PROCESS_KEYS], 'exec params');
    return { execId: str(o['execId'], 'execId', 128), ...processParams(o) };
  },
  fresh(v) {
    const o = obj(v ?? {}, 'fresh params');
    onlyKeys(o, ['timeMs', 'hostname', 'entropy'], 'fresh params');
    const hostname = str(o['hostname'], 'hostname', 64);
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(hostname))
      throw new AegisError('INVALID_ARGUMENT', 'hostname has characters a hostname cannot');
    return { timeMs: int(o['timeMs'], 'timeMs'), hostname, entropy: str(o['entropy'], 'entropy', 1024) };
  },
  resize(v) {
    const o = obj(v ?? {}, 'resize params');
    onlyKeys(o, ['execId', 'rows', 'cols'], 'resize params');
    const execId = optStr(o['execId'], 'execId', 128);
    const size = ttySize({ rows: o['rows'], cols: o['cols'] });
    return execId === undefined ? size : { execId, ...size };
  },
  stdin(v) {
    const o = obj(v ?? {}, 'stdin params');
    onlyKeys(o, ['execId', 'data', 'eof'], 'stdin params');
    const out: StdinParams = {};
    const execId = optStr(o['execId'], 'execId');
    if (execId !== undefined) out.execId = execId;
    if (o['data'] !== undefined) out.data = str(o['data'], 'data', 16 << 20);
    if (o['eof'] === true) out.eof = true;
    return out;
  },
  signal(v) {
    const o = obj(v ?? {}, 'signal params');
    onlyKeys(o, ['execId', 'signal', 'group'], 'signal params');
    const execId = optStr(o['execId'], 'execId');
    const p: SignalParams = { signal: str(o['signal'], 'signal', 16) };
    if (execId !== undefined) p.execId = execId;
    if (o['group'] === true) p.group = true;
    return p;
  },
  health(v) {
    onlyKeys(obj(v ?? {}, 'health params'), [], 'health params');
    return {};
  },
  ps(v) {
    onlyKeys(obj(v ?? {}, 'ps params'), [], 'ps params');
    return {};
  },
  stats(v) {
    onlyKeys(obj(v ?? {}, 'stats params'), [], 'stats params');
    return {};
  },
  shutdown(v) {
    const o = obj(v ?? {}, 'shutdown params');
    onlyKeys(o, ['timeoutMs'], 'shutdown params');
    return o['timeoutMs'] === undefined ? {} : { timeoutMs: int(o['timeoutMs'], 'timeoutMs') };
  },
};

export const parseResult: { [M in GuestMethod]: (v: unknown) => GuestMethods[M]['result'] } = {
  run(v) {
    const o = strict(v, ['pid', 'startedAtMs'], 'run result');
    return { pid: pid(o['pid']), startedAtMs: int(o['startedAtMs'], 'startedAtMs', 0) };
  },
  exec(v) {
    return { pid: pid(strict(v, ['pid'], 'exec result')['pid']) };
  },
  signal(v) {
    return empty(v, 'signal result');
  },
  stdin(v) {
    return empty(v, 'stdin result');
  },
  resize(v) {
    return empty(v, 'resize result');
  },
  fresh(v) {
    return empty(v, 'fresh result');
  },
  health(v) {
    const o = strict(v, ['version', 'uptimeMs', 'workload'], 'health result');
    let workload: HealthResult['workload'] = null;
    if (o['workload'] !== null) {
      const w = strict(o['workload'], ['pid', 'running'], 'workload');
      workload = { pid: pid(w['pid']), running: bool(w['running'], 'running') };
    }
    return { version: int(o['version'], 'version', 0), uptimeMs: int(o['uptimeMs'], 'uptimeMs', 0), workload };
  },
  ps(v) {
    const o = strict(v, ['processes', 'truncated'], 'ps result');
    const list = o['processes'];
    if (!Array.isArray(list) || list.length > MAX_PS_PROCESSES) {
      throw new AegisError('INVALID_ARGUMENT', `processes must be an array of at most ${MAX_PS_PROCESSES}`);
    }
    const processes = list.map((p: unknown): ProcessInfo => {
      const e = strict(p, ['pid', 'ppid', 'uid', 'state', 'rssKiB', 'cpuMs', 'startedAfterBootMs', 'command'], 'process');
      const state = str(e['state'], 'state', 1);
      if (!/^[A-Za-z]$/.test(state)) throw new AegisError('INVALID_ARGUMENT', 'state must be one letter');
      return {
        pid: pid(e['pid']),
        ppid: int(e['ppid'], 'ppid', 0, MAX_PID),
        uid: int(e['uid'], 'uid', 0, 0xffffffff),
        state,
        rssKiB: int(e['rssKiB'], 'rssKiB', 0),
        cpuMs: int(e['cpuMs'], 'cpuMs', 0),
        startedAfterBootMs: int(e['startedAfterBootMs'], 'startedAfterBootMs', 0),
        command: str(e['command'], 'command', MAX_PS_COMMAND),
      };
    });
    return o['truncated'] === true ? { processes, truncated: true } : { processes };
  },
  stats(v) {
    const o = strict(v, ['memTotalKiB', 'memAvailableKiB', 'processes'], 'stats result');
    const memTotalKiB = int(o['memTotalKiB'], 'memTotalKiB', 0, 2 ** 40);
    return {
      memTotalKiB,
      memAvailableKiB: int(o['memAvailableKiB'], 'memAvailableKiB', 0, memTotalKiB),
      processes: int(o['processes'], 'processes', 0, MAX_PID),
    };
  },
  shutdown(v) {
    return empty(v, 'shutdown result');
  },
};

export const parseEvent: { [E in GuestEvent]: (v: unknown) => GuestEvents[E] } = {
  ready(v) {
    return { version: int(strict(v, ['version'], 'ready')['version'], 'version', 0) };
  },
  output(v) {
    const o = strict(v, ['execId', 'stream', 'data'], 'output');
    const execId = optStr(o['execId'], 'execId', MAX_EXEC_ID);
    const ev: OutputEvent = { stream: stream(o['stream']), data: base64(o['data'], 'data', MAX_OUTPUT_BASE64) };
    if (execId !== undefined) ev.execId = execId;
    return ev;
  },
  exit(v) {
    return exitFields(strict(v, ['exitCode', 'signal', 'bytes', 'truncated'], 'exit'));
  },
  execExit(v) {
    const o = strict(v, ['execId', 'exitCode', 'signal', 'bytes', 'truncated', 'durationMs'], 'execExit');
    const ev: ExecExitEvent = { execId: str(o['execId'], 'execId', MAX_EXEC_ID), ...exitFields(o) };
    if (o['durationMs'] !== undefined) ev.durationMs = int(o['durationMs'], 'durationMs', 0);
    return ev;
  },
};

export function isGuestMethod(m: string): m is GuestMethod {
  return Object.hasOwn(parseParams, m);
}
export function isGuestEvent(m: string): m is GuestEvent {
  return Object.hasOwn(parseEvent, m);
}

/** The shell's exit status for an exit: the code, or 128 + N when killed by signal N. */
export function exitStatus(ev: ExitEvent): number {
  if (ev.exitCode !== null) return ev.exitCode;
  const n = ev.signal === null ? undefined : (osConstants.signals as Record<string, number | undefined>)[ev.signal];
  return n === undefined ? 255 : 128 + n;
}
