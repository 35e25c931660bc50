/**
 * The workload and exec'd processes: spawning, streaming output, signals, exit reporting.
 * Each process leads its own process group so a stop reaches everything it started.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { stat } from 'node:fs/promises';
import { constants as osConstants } from 'node:os';
import { AegisError, type ExitEvent, type ImageContext, type Stream, type TtySize } from '@aegis/protocol';
import { imageLaunch } from './image.js';

export interface ProcessSpec {
  command: string[];
  env: Record<string, string>;
  workdir?: string;
  stdin?: boolean;
  tty?: TtySize;
  image?: ImageContext;
}

/** aegis-init doubles as the PTY helper (`aegis-init pty ROWS COLS -- CMD`): Node has no openpty. */
const PTY_HELPER = '/aegis/init';

export interface ProcessEvents {
  onOutput: (stream: Stream, data: Buffer) => void;
  onExit: (exit: ExitEvent) => void;
}

/** After the main process exits, how long its pipes may stay open (held by background children). */
const PIPE_GRACE_MS = 100;

export const BASE_ENV: Record<string, string> = {
  PATH: '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
  HOME: '/root',
  LANG: 'C.UTF-8',
};

export class GuestProcess {
  private exited = false;

  private constructor(readonly child: ChildProcess) {}

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return !this.exited;
  }

  /** Resolves once the process runs; NOT_FOUND or INVALID_ARGUMENT when it cannot start. */
  static async start(spec: ProcessSpec, events: ProcessEvents): Promise<GuestProcess> {
    let command = spec.command;
    let env = { ...BASE_ENV, ...spec.env };
    let cwd = spec.workdir ?? '/';
    if (spec.image) {
      // The helper enters the image root, switches user and changes directory there.
      ({ argv: command, env } = await imageLaunch(spec.command, spec.env, spec.workdir, spec.image));
      cwd = '/';
    } else if (spec.workdir !== undefined) {
      const st = await stat(spec.workdir).catch(() => undefined);
      if (!st?.isDirectory()) throw new AegisError('INVALID_ARGUMENT', `workdir ${spec.workdir} is not a directory in the guest`);
    }
    const [file, ...args] = command;
    if (file === undefined) throw new AegisError('INVALID_ARGUMENT', 'command is empty');
    const tty = spec.tty;
    const child = tty
      ? spawn(PTY_HELPER, ['pty', String(tty.rows), String(tty.cols), '--', file, ...args], {
          cwd,
          env: { TERM: 'xterm', ...env },
          stdio: ['pipe', 'pipe', 'pipe', 'pipe'],
          detached: true,
        })
      : spawn(file, args, {
          cwd,
          env,
          stdio: [spec.stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
          detached: true,
        });
    const gp = new GuestProcess(child);
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
        gp.wire(events);
        resolve(gp);
      });
    });
  }

  private wire(events: ProcessEvents): void {
    const child = this.child;
    child.stdout?.on('data', (d: Buffer) => events.onOutput('stdout', d));
    child.stderr?.on('data', (d: Buffer) => events.onOutput('stderr', d));
    child.once('exit', (code, signal) => {
      this.exited = true;
      let reported = false;
      // Both paths below can fire: destroying the pipes held by a background child makes
      // them close, and 'close' follows. Consumers treat an exit as final, so only one counts.
      const report = (): void => {
        if (reported) return;
        reported = true;
        clearTimeout(timer);
        events.onExit({ exitCode: code, signal });
      };
      // Let buffered output arrive first ('close' comes only once the pipes are drained), but
      // don't wait for background children holding the pipes: the process's life is what the
      // user asked about.
      const timer = setTimeout(() => {
        child.stdout?.destroy();
        child.stderr?.destroy();
        report();
      }, PIPE_GRACE_MS);
      child.once('close', report);
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
    this.child.kill(name as NodeJS.Signals);
  }

  /** Signals the whole process group. */
  signalGroup(name: NodeJS.Signals): void {
    if (this.exited || this.child.pid === undefined) return;
    try {
      process.kill(-this.child.pid, name);
    } catch {
      // group already gone
    }
  }

  /** SIGTERM to the group, SIGKILL after `timeoutMs`; resolves when the process has exited. */
  async terminate(timeoutMs: number): Promise<void> {
    if (this.exited) return;
    const done = new Promise<void>((r) => this.child.once('exit', () => r()));
    this.signalGroup('SIGTERM');
    const timer = setTimeout(() => this.signalGroup('SIGKILL'), timeoutMs);
    await done;
    clearTimeout(timer);
  }
}
