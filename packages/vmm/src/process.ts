/**
 * The one supervisor of the detached processes backends start: a VMM (QEMU, Firecracker), a
 * helper (passt), or a launcher that becomes the VM (libkrun's `krun_start_enter`). Every
 * backend needs the same four things from it, and each wrote them once already, differently:
 * - start detached, in its own session, with no pipes to aegisd (so a VM outlives a daemon
 *   restart), stdout and stderr appended to a log file;
 * - a record that names the process for the life of the host: its pid and its start time
 *   (`/proc/<pid>/stat` field 22). A pid is reused once its process is gone; a pid together
 *   with its start time is not, so a later aegisd never mistakes a stranger for the VM;
 * - an exit noticed within a fraction of a second, also for a process adopted from an earlier
 *   aegisd (not our child: no exit event, so its pid is polled), where a zombie counts as gone
 *   (it runs nothing, and a parent that never reaps it must not hold us);
 * - stop with a deadline: a graceful request, then SIGKILL once `timeoutMs` has passed,
 *   returning once the process is gone.
 */
import { spawn as nodeSpawn, type ChildProcess, type SpawnOptions } from 'node:child_process';
import { closeSync, openSync, promises as fs, readFileSync } from 'node:fs';
import { AegisError } from '@aegis/protocol';

/** Starts a process; replaceable so tests can run a stand-in for a VMM binary. */
export type SpawnFn = (binary: string, args: string[], options: SpawnOptions) => ChildProcess;

/** What a record keeps to find the process again. */
export interface ProcessIdentity {
  pid: number;
  /**
   * When it started, in clock ticks after boot (`/proc/<pid>/stat` field 22). Absent in
   * records written before it was kept; then only the caller's command-line check applies.
   */
  startTicks?: number;
}

export interface ProcessExit {
  /** The exit status, when the process was our child and exited. */
  code: number | null;
  /** The signal that ended it, when it was our child. */
  signal: NodeJS.Signals | null;
  /**
   * Whether `code` and `signal` are known. An adopted process is not our child: its status
   * went to whoever its parent became, so only its going is known.
   */
  statusKnown: boolean;
}

/** How often an adopted process's pid is looked at. */
const POLL_MS = 100;
/** How long `stop` waits for a zombie to be reaped before it counts as gone. */
const ZOMBIE_GRACE_MS = 1000;

interface ProcStat {
  /** R, S, D, T, Z... */
  state: string;
  startTicks: number;
}

function parseStat(text: string): ProcStat | undefined {
  // The command name (field 2) is in parentheses and may hold spaces or ')': split after the last.
  const close = text.lastIndexOf(')');
  if (close < 0) return undefined;
  const fields = text.slice(close + 2).split(' ');
  // Field 3 (state) is fields[0]; field 22 (starttime) is fields[19].
  const startTicks = Number(fields[19]);
  return fields[0] && Number.isFinite(startTicks) ? { state: fields[0], startTicks } : undefined;
}

/** `/proc/<pid>/stat`, or undefined when there is no such process. */
export async function procStat(pid: number): Promise<ProcStat | undefined> {
  return parseStat(await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => ''));
}

function procStatSync(pid: number): ProcStat | undefined {
  try {
    return parseStat(readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return undefined;
  }
}

/** A process's argv, or [] when it has gone (or is a kernel thread). */
export async function procArgv(pid: number): Promise<string[]> {
  const raw = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
  return raw ? raw.replace(/\0$/, '').split('\0') : [];
}

/** Is this identity's process still there and running (not a zombie, not a reused pid)? */
function stillThere(stat: ProcStat | undefined, startTicks: number | undefined): boolean {
  return stat !== undefined && stat.state !== 'Z' && stat.state !== 'X' && (startTicks === undefined || stat.startTicks === startTicks);
}

export interface SpawnDetachedOptions {
  /** stdout and stderr are appended here (opened O_APPEND, so the file may be cut back). */
  logFile: string;
  cwd?: string;
  env?: NodeJS.ProcessEnv;
  spawn?: SpawnFn;
  /** Names the process in errors ("QEMU", "passt"). */
  what?: string;
}

export class DetachedProcess {
  /** Resolves once, when the process has gone, unless `release` was called first. */
  readonly exited: Promise<ProcessExit>;
  private resolveExit!: (e: ProcessExit) => void;
  private done = false;
  private released = false;
  private poll: NodeJS.Timeout | undefined;

  private constructor(
    readonly pid: number,
    /** Undefined only when the process was gone before its start time could be read. */
    readonly startTicks: number | undefined,
    private readonly child: ChildProcess | undefined,
    /** A further check that a pid is still ours (the VMM's command line names the VM). */
    private readonly verify?: (argv: string[]) => boolean,
  ) {
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
  }

  /**
   * Starts `binary` detached (own session, stdin closed, output to `logFile`) and resolves once
   * it runs; UNAVAILABLE when it cannot be started (missing binary, not executable).
   */
  static async spawn(binary: string, args: string[], options: SpawnDetachedOptions): Promise<DetachedProcess> {
    const log = openSync(options.logFile, 'a');
    let child: ChildProcess;
    try {
      child = (options.spawn ?? nodeSpawn)(binary, args, {
        detached: true,
        stdio: ['ignore', log, log],
        ...(options.cwd ? { cwd: options.cwd } : {}),
        ...(options.env ? { env: options.env } : {}),
      });
    } finally {
      closeSync(log);
    }
    child.unref();
    // Listened for before 'spawn' resolves: a process that exits at once must not be missed.
    const seen: { proc?: DetachedProcess; early?: ProcessExit } = {};
    child.once('exit', (code, signal) => {
      const e = { code, signal, statusKnown: true };
      if (seen.proc) seen.proc.settle(e);
      else seen.early = e;
    });
    const pid = await new Promise<number>((resolve, reject) => {
      child.once('spawn', () => resolve(child.pid ?? -1));
      child.once('error', (err) => reject(new AegisError('UNAVAILABLE', `cannot start ${options.what ?? binary}: ${err.message}`)));
    });
    const proc = new DetachedProcess(pid, (await procStat(pid))?.startTicks, child);
    seen.proc = proc;
    if (seen.early) proc.settle(seen.early);
    return proc;
  }

  /**
   * Takes over a process started by an earlier aegisd, from its record: undefined when that
   * process has gone (its pid gone, reused by another process, or a zombie) or `verify`
   * refuses its command line. Its end is then noticed by polling its pid.
   */
  static async adopt(identity: ProcessIdentity, verify?: (argv: string[]) => boolean): Promise<DetachedProcess | undefined> {
    if (!Number.isInteger(identity.pid) || identity.pid <= 0) return undefined;
    const stat = await procStat(identity.pid);
    if (!stillThere(stat, identity.startTicks)) return undefined;
    if (verify && !verify(await procArgv(identity.pid))) return undefined;
    const proc = new DetachedProcess(identity.pid, stat?.startTicks, undefined, verify);
    proc.watch();
    return proc;
  }

  /** What a record keeps: `adopt` finds this process again from it. */
  identity(): ProcessIdentity {
    return { pid: this.pid, ...(this.startTicks !== undefined ? { startTicks: this.startTicks } : {}) };
  }

  /** Whether this is our child (its exit status is then known). */
  get isChild(): boolean {
    return this.child !== undefined;
  }

  /** Has it gone (as far as this object has seen)? */
  get hasExited(): boolean {
    return this.done;
  }

  /**
   * Sends `signal` if the process is still this one (never to a stranger that reused the pid).
   * Returns whether it was sent.
   */
  kill(signal: NodeJS.Signals = 'SIGKILL'): boolean {
    if (this.done) return false;
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) return this.child.kill(signal);
    if (!stillThere(procStatSync(this.pid), this.startTicks)) return false;
    try {
      process.kill(this.pid, signal);
      return true;
    } catch {
      return false;
    }
  }

  /** Is the process still there and this one? Checks the pid itself, not only what was seen. */
  async running(): Promise<boolean> {
    if (this.done) return false;
    if (!stillThere(await procStat(this.pid), this.startTicks)) return false;
    return !this.verify || this.verify(await procArgv(this.pid));
  }

  /**
   * Ends the process: `ask` (default SIGTERM) first, SIGKILL once `timeoutMs` has passed (or
   * at once when `signal` aborts), and returns once it has gone. Also after `release`: then
   * the pid is checked to still be this process before anything is sent.
   */
  async stop(options: { timeoutMs?: number; ask?: () => unknown; signal?: AbortSignal } = {}): Promise<void> {
    if (!(await this.running())) return this.whenGone();
    const timeoutMs = options.timeoutMs ?? 3000;
    if (timeoutMs > 0) {
      try {
        // Not awaited: an `ask` over a control channel that does not answer must not hold the deadline.
        void Promise.resolve(options.ask ? options.ask() : this.kill('SIGTERM')).catch(() => undefined);
      } catch {
        // the request could not be made: the deadline's SIGKILL follows
      }
    }
    let timer: NodeJS.Timeout | undefined;
    let onAbort: (() => void) | undefined;
    const gone = await Promise.race([
      this.whenGone().then(() => true),
      new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(false), timeoutMs);
        timer.unref();
      }),
      new Promise<boolean>((resolve) => {
        onAbort = () => resolve(false);
        if (options.signal?.aborted) onAbort();
        else options.signal?.addEventListener('abort', onAbort, { once: true });
      }),
    ]);
    clearTimeout(timer);
    if (onAbort) options.signal?.removeEventListener('abort', onAbort);
    if (gone) return;
    this.kill('SIGKILL');
    await this.whenGone();
  }

  /**
   * Stops watching (the daemon is exiting; a later one adopts the process): `exited` then
   * never resolves through this object. `stop` still works.
   */
  release(): void {
    this.released = true;
    if (this.poll) clearInterval(this.poll);
    this.poll = undefined;
  }

  /**
   * Resolves once the process has gone from the process table: our child once reaped (its
   * 'exit'); another's once its pid is gone or reused, or after it has been a zombie for
   * ZOMBIE_GRACE_MS (its parent normally reaps it within milliseconds; one that never does must
   * not hold us).
   */
  private async whenGone(): Promise<void> {
    const child = this.child;
    if (child) {
      if (child.exitCode === null && child.signalCode === null) await new Promise((r) => child.once('exit', r));
      return;
    }
    let zombieMs = 0;
    for (;;) {
      const stat = await procStat(this.pid);
      if (!stat || (this.startTicks !== undefined && stat.startTicks !== this.startTicks)) break;
      if (stat.state === 'Z' || stat.state === 'X') zombieMs += 20;
      if (zombieMs >= ZOMBIE_GRACE_MS) break;
      await new Promise((r) => setTimeout(r, 20));
    }
    this.settle({ code: null, signal: null, statusKnown: false });
  }

  private watch(): void {
    this.poll = setInterval(() => {
      void procStat(this.pid).then((stat) => {
        if (!stillThere(stat, this.startTicks)) this.settle({ code: null, signal: null, statusKnown: false });
      });
    }, POLL_MS);
    this.poll.unref();
  }

  private settle(e: ProcessExit): void {
    if (this.done) return;
    this.done = true;
    if (this.poll) clearInterval(this.poll);
    this.poll = undefined;
    if (!this.released) this.resolveExit(e);
  }
}

/** A process a backend started for a VM (or for its helper) that no record given keeps. */
export interface StrayProcess {
  pid: number;
  /** The first path component under the directory searched: whose VM it was (an instance id). */
  owner: string;
  /** What it is, for the log ("QEMU", "passt"). */
  what: string;
  /** SIGKILLs it, unless its pid has meanwhile gone to another process. */
  end(): boolean;
}

/** What a backend says a process of its own is: its VMM, or a helper that goes with a VMM. */
export type ProcessKind = { what: string; helper: boolean } | undefined;

/**
 * The processes whose command line names a path under `dir` and that `classify` calls a
 * backend's, except the VMM of each `kept` VM and any helper in a kept VM's directory (a
 * helper has its own pid and goes with its VMM). What a restarted aegisd ends: VMs no live
 * instance owns (a start whose record was never written, a pooled VM, a half-built template).
 */
export async function findStrays(
  dir: string,
  kept: { identity: ProcessIdentity; stateDir: string }[],
  classify: (argv: string[]) => ProcessKind,
): Promise<StrayProcess[]> {
  const prefix = `${dir.replace(/\/+$/, '')}/`;
  const ownerOf = (text: string): string | undefined => {
    const at = text.indexOf(prefix);
    return at < 0 ? undefined : text.slice(at + prefix.length).split(/[/\0,]/)[0] || undefined;
  };
  const keptOwners = new Set(kept.map((k) => ownerOf(`${k.stateDir}/`)).filter((o) => o !== undefined));
  const keptPids = new Map(kept.map((k) => [k.identity.pid, k.identity.startTicks]));
  const strays: StrayProcess[] = [];
  for (const name of await fs.readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    const argv = await procArgv(pid);
    const owner = ownerOf(argv.join('\0'));
    if (!owner) continue;
    const kind = classify(argv);
    if (!kind) continue;
    const stat = await procStat(pid);
    if (!stat) continue;
    if (keptPids.has(pid)) {
      const ticks = keptPids.get(pid);
      if (ticks === undefined || ticks === stat.startTicks) continue;
    }
    if (kind.helper && keptOwners.has(owner)) continue;
    const startTicks = stat.startTicks;
    strays.push({
      pid,
      owner,
      what: kind.what,
      end: () => {
        if (!stillThere(procStatSync(pid), startTicks)) return false;
        try {
          process.kill(pid, 'SIGKILL');
          return true;
        } catch {
          return false;
        }
      },
    });
  }
  return strays;
}
