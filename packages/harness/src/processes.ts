/**
 * The workload and exec'd processes: spawning, streaming output, signals, exit reporting.
 * Each process leads its own process group so a stop reaches everything it started.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { constants as fsConstants } from 'node:fs';
import { access, rmdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { constants as osConstants } from 'node:os';
import { AegisError, type ExitEvent, type ProcessParams, type Stream, type TtySize } from '@aegis/protocol';
import { DEFAULT_IMAGE_PATH, IMAGE_ROOT, ensureWorkdir, rootLaunch } from './image.js';

/** What `run` and `exec` ask for, and where the process's cgroup goes. */
export type ProcessSpec = ProcessParams & {
  /** Names its cgroup under the workload's (`main` for the workload, one per exec). */
  cgroupName?: string;
};

/** aegis-init doubles as the PTY helper (`aegis-init pty ROWS COLS -- CMD`): Node has no openpty. */
const PTY_HELPER = '/aegis/init';

export interface ProcessEvents {
  onOutput: (stream: Stream, data: Buffer) => void;
  onExit: (exit: ExitEvent) => void;
}

/**
 * After the main process exits, its output is read to the end: the exit is reported once both
 * pipes reach EOF. A background child that keeps a pipe open would hold the exit forever, so
 * the pipes are closed (and the exit says `truncated`) once nothing has arrived for
 * PIPE_IDLE_GRACE_MS, or PIPE_MAX_GRACE_MS after the exit at the latest. Time spent paused for
 * backpressure (the host reading slowly) does not count: that output is still coming.
 */
export const PIPE_IDLE_GRACE_MS = 1000;
export const PIPE_MAX_GRACE_MS = 10_000;

/**
 * Output flow control. The harness pauses every process's pipes while the agent channel is
 * congested, so a process that writes faster than the host reads blocks in write(2), as with
 * a pipe to a slow reader, instead of growing the harness's heap until it dies.
 */
export class OutputGate {
  private paused = false;
  private readonly streams = new Set<NodeJS.ReadableStream>();
  private pausedMs = 0;
  private pausedAt = 0;

  get isPaused(): boolean {
    return this.paused;
  }

  /** Total time spent paused so far (for grace accounting). */
  pausedTotalMs(): number {
    return this.pausedMs + (this.paused ? Date.now() - this.pausedAt : 0);
  }

  add(s: NodeJS.ReadableStream): void {
    this.streams.add(s);
    if (this.paused) s.pause();
  }

  remove(s: NodeJS.ReadableStream): void {
    this.streams.delete(s);
  }

  pause(): void {
    if (this.paused) return;
    this.paused = true;
    this.pausedAt = Date.now();
    for (const s of this.streams) s.pause();
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.pausedMs += Date.now() - this.pausedAt;
    for (const s of this.streams) s.resume();
  }
}

/** The workload's cgroup, prepared by aegis-init at boot (absent on a host running tests). */
const WORKLOAD_CGROUP = '/sys/fs/cgroup/workload';
let cgroupChecked: Promise<string | undefined> | undefined;

function workloadCgroup(): Promise<string | undefined> {
  cgroupChecked ??= access(`${WORKLOAD_CGROUP}/cgroup.procs`, fsConstants.W_OK).then(
    () => WORKLOAD_CGROUP,
    () => undefined,
  );
  return cgroupChecked;
}

/** NOT_FOUND for a command that is not there, INVALID_ARGUMENT for one that cannot run. */
async function checkCommand(file: string, pathVar: string, cwd: string): Promise<void> {
  const candidates = file.includes('/') ? [path.resolve(cwd, file)] : pathVar.split(':').map((d) => path.join(d || '.', file));
  let sawFile = false;
  for (const c of candidates) {
    const st = await stat(c).catch(() => undefined);
    if (!st?.isFile()) continue;
    sawFile = true;
    if (
      await access(c, fsConstants.X_OK).then(
        () => true,
        () => false,
      )
    )
      return;
  }
  if (sawFile) throw new AegisError('INVALID_ARGUMENT', `permission denied: ${file}`);
  throw new AegisError('NOT_FOUND', `command not found: ${file}`);
}

/** No flow control (tests that drive a process on the host). */
const OPEN_GATE = new OutputGate();

export const BASE_ENV: Record<string, string> = {
  PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  HOME: '/root',
  LANG: 'C.UTF-8',
};

/** The first line of the `ns` helper's fd 4: the command's pid (undefined if it ended first). */
async function commandPid(report: NodeJS.ReadableStream): Promise<number | undefined> {
  let text = '';
  try {
    for await (const chunk of report as AsyncIterable<Buffer>) {
      text += chunk.toString('latin1');
      if (text.includes('\n') || text.length > 32) break;
    }
  } catch {
    // closed early: the command did not start
  }
  (report as NodeJS.ReadableStream & { destroy?: () => void }).destroy?.();
  const pid = Number.parseInt(text, 10);
  return Number.isSafeInteger(pid) && pid > 1 ? pid : undefined;
}

export class GuestProcess {
  private exited = false;
  /** The command's own pid when a helper stands in for it (the `ns` helper); signals go there. */
  private target: number | undefined;

  private constructor(readonly child: ChildProcess) {}

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return !this.exited;
  }

  /** Resolves once the process runs; NOT_FOUND or INVALID_ARGUMENT when it cannot start. */
  static async start(spec: ProcessSpec, events: ProcessEvents, gate: OutputGate = OPEN_GATE): Promise<GuestProcess> {
    let command = spec.command;
    let env = { ...BASE_ENV, ...spec.env };
    let cwd = spec.workdir ?? '/';
    const user = spec.user ?? spec.image?.user;
    if (spec.image || user !== undefined) {
      // The helper enters the root (the image's, or ours to switch user), switches user and
      // changes directory there.
      const [root, defaults] = spec.image ? [IMAGE_ROOT, { PATH: DEFAULT_IMAGE_PATH }] : ['/', BASE_ENV];
      ({ argv: command, env } = await rootLaunch(root, spec.command, spec.env, spec.workdir, user, defaults));
      cwd = '/';
    } else if (spec.workdir !== undefined) {
      await ensureWorkdir('/', spec.workdir);
    }
    const [file, ...args] = command;
    if (file === undefined) throw new AegisError('INVALID_ARGUMENT', 'command is empty');
    const cgroup = await workloadCgroup();
    // Through the cgroup helper, a missing command would only show as exit 127: say it first.
    if (cgroup && !spec.image && user === undefined) await checkCommand(file, env['PATH'] ?? BASE_ENV['PATH'] ?? '', cwd);
    const tty = spec.tty;
    const inner = tty ? [PTY_HELPER, 'pty', String(tty.rows), String(tty.cols), '--', file, ...args] : [file, ...args];
    // Its own child of the workload cgroup: the CPU is shared fairly between the workload and
    // each exec (a fork bomb in one does not starve the next), under the workload's limits.
    const own = cgroup ? `${cgroup}/${spec.cgroupName ?? 'main'}` : undefined;
    const chain = own ? [PTY_HELPER, 'cg', own, '--', ...inner] : inner;
    // In the VM, through the workload's PID namespace (`aegis-init ns`): its processes do not
    // see this agent. The helper stays as the command's stand-in and says on fd 4 which pid
    // is the command's.
    const [bin = file, ...argv] = own ? [PTY_HELPER, 'ns', '--', ...chain] : chain;
    const stdio: ('pipe' | 'ignore')[] = tty ? ['pipe', 'pipe', 'pipe', 'pipe'] : [spec.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'];
    if (own) stdio.push(...(tty ? [] : ['ignore' as const]), 'pipe');
    const child = spawn(bin, argv, {
      cwd,
      env: tty ? { TERM: 'xterm', ...env } : env,
      stdio,
      detached: true,
    });
    const gp = new GuestProcess(child);
    if (own) child.once('close', () => void rmdir(own).catch(() => undefined)); // busy while background processes live
    return new Promise((resolve, reject) => {
      child.once('error', (err: NodeJS.ErrnoException) => {
        if (child.pid !== undefined) return; // errors after spawn surface through exit
        if (err.code === 'ENOENT') {
          reject(new AegisError('NOT_FOUND', `command not found: ${file}`));
        } else if (err.code === 'EACCES') {
          reject(new AegisError('INVALID_ARGUMENT', `permission denied: ${file}`));
        } else {
          reject(new AegisError('INTERNAL', `cannot start ${file}: ${err.message}`));
        }
      });
      child.once('spawn', () => {
        gp.wire(events, gate);
        const report = child.stdio[4];
        if (!report) return resolve(gp);
        // Resolved once the pid is known, so a signal sent right after the start reaches it.
        void commandPid(report as NodeJS.ReadableStream).then((pid) => {
          if (pid !== undefined && pid !== child.pid) gp.target = pid;
          resolve(gp);
        });
      });
    });
  }

  private wire(events: ProcessEvents, gate: OutputGate): void {
    const child = this.child;
    const bytes = { stdout: 0, stderr: 0 };
    let lastDataAt = Date.now();
    const pipes: [Stream, NodeJS.ReadableStream | null][] = [
      ['stdout', child.stdout],
      ['stderr', child.stderr],
    ];
    for (const [stream, pipe] of pipes) {
      if (!pipe) continue;
      gate.add(pipe);
      pipe.on('data', (d: Buffer) => {
        bytes[stream] += d.length;
        lastDataAt = Date.now();
        events.onOutput(stream, d);
      });
      pipe.once('close', () => gate.remove(pipe));
    }
    let reported = false;
    let timer: NodeJS.Timeout | undefined;
    const report = (exit: Omit<ExitEvent, 'bytes'>, truncated: boolean): void => {
      if (reported) return;
      reported = true;
      clearTimeout(timer);
      events.onExit({ ...exit, bytes: { ...bytes }, ...(truncated ? { truncated: true } : {}) });
    };
    child.once('exit', (code, signal) => {
      this.exited = true;
      const exit = { exitCode: code, signal };
      const exitedAt = Date.now();
      const pausedAtExit = gate.pausedTotalMs();
      // 'close' comes once both pipes reached EOF: everything written was read and sent.
      child.once('close', () => report(exit, false));
      const check = (): void => {
        if (reported) return;
        const now = Date.now();
        const active = now - exitedAt - (gate.pausedTotalMs() - pausedAtExit);
        const idle = !gate.isPaused && now - lastDataAt >= PIPE_IDLE_GRACE_MS;
        if (!idle && active < PIPE_MAX_GRACE_MS) {
          timer = setTimeout(check, 100);
          return;
        }
        // Data may be waiting in a pipe the event loop has not polled yet: look once more
        // after this loop iteration's I/O before cutting anything off.
        const seen = lastDataAt;
        setImmediate(() => {
          if (reported) return;
          if (lastDataAt !== seen && active < PIPE_MAX_GRACE_MS) {
            timer = setTimeout(check, 100);
            return;
          }
          child.stdout?.destroy();
          child.stderr?.destroy();
          report(exit, true);
        });
      };
      timer = setTimeout(check, 100);
    });
  }

  /** Feeds the process's stdin; FAILED_PRECONDITION when it was started without one. */
  write(data: Buffer | undefined, eof: boolean): void {
    const stdin = this.child.stdin;
    if (!stdin) throw new AegisError('FAILED_PRECONDITION', 'this process was started without stdin (use -i)');
    if (stdin.destroyed || stdin.writableEnded) return; // it stopped reading: drop, like a closed pipe
    stdin.on('error', () => undefined); // EPIPE when the process exits first
    if (data && data.length > 0) stdin.write(data);
    if (eof) stdin.end();
  }

  /** Resizes the process's terminal; FAILED_PRECONDITION without one. */
  resize(size: TtySize): void {
    const ctl = this.child.stdio[3];
    if (!ctl || !('write' in ctl)) throw new AegisError('FAILED_PRECONDITION', 'this process has no terminal (use -t)');
    if (!this.exited) (ctl as NodeJS.WritableStream).write(`${size.rows} ${size.cols}\n`);
  }

  signal(name: string): void {
    if (!Object.hasOwn(osConstants.signals, name)) {
      throw new AegisError('INVALID_ARGUMENT', `unknown signal ${name}`);
    }
    if (this.exited) return;
    if (this.target === undefined) {
      this.child.kill(name as NodeJS.Signals);
      return;
    }
    try {
      process.kill(this.target, name as NodeJS.Signals);
    } catch {
      // it has just ended: its stand-in is about to say so
    }
  }

  /**
   * Signals the whole process group. Also after the leader exited: what it started in the
   * background may still run (a client that went away wants all of it gone).
   */
  signalGroup(name: string): void {
    if (!Object.hasOwn(osConstants.signals, name)) {
      throw new AegisError('INVALID_ARGUMENT', `unknown signal ${name}`);
    }
    if (this.child.pid === undefined) return;
    try {
      process.kill(-this.child.pid, name as NodeJS.Signals);
    } catch {
      // group already gone
    }
  }

  /** SIGTERM to the group, SIGKILL after `timeoutMs`; resolves when the process has exited. */
  /** SIGTERM, then SIGKILL after `timeoutMs`; how it ended (undefined: it had ended before). */
  async terminate(timeoutMs: number): Promise<Pick<ExitEvent, 'exitCode' | 'signal'> | undefined> {
    if (this.exited) return undefined;
    const done = new Promise<Pick<ExitEvent, 'exitCode' | 'signal'>>((r) =>
      this.child.once('exit', (code, signal) => r({ exitCode: code, signal: signal ?? null })),
    );
    this.signalGroup('SIGTERM');
    const timer = setTimeout(() => this.signalGroup('SIGKILL'), timeoutMs);
    const ended = await done;
    clearTimeout(timer);
    return ended;
  }
}
