/**
 * A third backend, for tests: shaped like libkrun (one launcher process per VM that becomes
 * the VM, vsock-only channels reached through unix sockets the launcher listens on, pause by
 * SIGSTOP/SIGCONT of that process, no snapshots, no disk clones, no network, no volumes). Its
 * "VM" is a real child process (launcher-vm.mjs) serving a scripted harness, so it runs
 * anywhere. It is built only from what @aegis/vmm offers every backend (the process
 * supervisor, stray discovery, file tails), and reaches the daemon and the shared suite only
 * through the registry (`registerBackend`, or `AEGIS_BACKEND_MODULES` for a module exporting
 * `backends`): the proof that a backend can be added without editing the daemon.
 */
import { existsSync } from 'node:fs';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { AegisError } from '@aegis/protocol';
import {
  connectSocket,
  DetachedProcess,
  fileTail,
  findStrays,
  type Backend,
  type BackendEntry,
  type Capabilities,
  type Probe,
  type ProcessExit,
  type ProcessIdentity,
  type StrayProcess,
  type Vm,
  type VmConfig,
  type VmExit,
  type VmRecord,
} from '@aegis/vmm';

export const LAUNCHER_BACKEND = 'launcher-test';
const SCRIPT = fileURLToPath(new URL('./launcher-vm.mjs', import.meta.url));

const CAPABILITIES: Capabilities = {
  pause: true,
  snapshot: false,
  survivesDaemonRestart: true,
  agentTransport: 'vsock',
  acceleration: 'tcg',
  networkModes: ['none'],
  diskClones: false,
  volumeKinds: [],
  cpu: 'launcher',
};

interface LauncherRecord extends ProcessIdentity {
  backend: typeof LAUNCHER_BACKEND;
  id: string;
  stateDir: string;
}

function parseRecord(record: VmRecord): LauncherRecord | undefined {
  const r = record as Partial<LauncherRecord>;
  if (r.backend !== LAUNCHER_BACKEND || typeof r.pid !== 'number' || typeof r.id !== 'string' || typeof r.stateDir !== 'string') {
    return undefined;
  }
  return { ...(r as LauncherRecord) };
}

const isLauncher = (argv: string[]): boolean => argv.some((a) => a === SCRIPT);
const isOurLauncher =
  (id: string) =>
  (argv: string[]): boolean =>
    isLauncher(argv) && argv[argv.indexOf('--id') + 1] === id;

export class LauncherBackend implements Backend {
  readonly name = LAUNCHER_BACKEND;

  async probe(): Promise<Probe> {
    return {
      available: true,
      detail: 'test backend: one launcher process per VM (node), a scripted harness on vsock-style sockets; no guest kernel',
      capabilities: { ...CAPABILITIES },
      accelerationReason: 'none: no guest is emulated',
      version: 'launcher-test 1',
    };
  }

  async create(config: VmConfig, signal?: AbortSignal): Promise<Vm> {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'create cancelled');
    const refuse = (what: string): never => {
      throw new AegisError('UNSUPPORTED', `the ${LAUNCHER_BACKEND} backend has no ${what}`);
    };
    if (config.restoreFrom || config.snapshotMemory) refuse('snapshots');
    if (config.scratchDiskCloned) refuse('disk clones');
    if (config.network !== 'none') refuse(`${config.network} networking`);
    if ((config.volumes ?? []).length > 0) refuse('volumes');
    return new LauncherVm(config.id, config.stateDir, undefined);
  }

  async attach(record: VmRecord, signal?: AbortSignal): Promise<Vm> {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'attach cancelled');
    const r = parseRecord(record);
    if (!r) throw new AegisError('INVALID_ARGUMENT', `not a ${LAUNCHER_BACKEND} VM record`);
    const proc = await DetachedProcess.adopt(r, isOurLauncher(r.id));
    if (!proc) throw new AegisError('NOT_FOUND', `the launcher of VM ${r.id} is gone`);
    return new LauncherVm(r.id, r.stateDir, proc);
  }

  async strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]> {
    const kept = keep.map(parseRecord).flatMap((r) => (r ? [{ identity: r, stateDir: r.stateDir }] : []));
    return findStrays(dir, kept, (argv) => (isLauncher(argv) ? { what: 'launcher', helper: false } : undefined));
  }
}

class LauncherVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  private stopRequested = false;
  private detached = false;
  private readonly log: string;

  constructor(
    readonly id: string,
    private readonly stateDir: string,
    private proc: DetachedProcess | undefined,
  ) {
    this.log = path.join(stateDir, 'launcher.log');
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
    if (proc) void proc.exited.then((e) => this.onGone(e));
  }

  record(): VmRecord {
    if (!this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const r: LauncherRecord = { backend: LAUNCHER_BACKEND, id: this.id, ...this.proc.identity(), stateDir: this.stateDir };
    return { ...r };
  }

  hostPid(): number | undefined {
    return this.proc?.pid;
  }

  async start(signal?: AbortSignal): Promise<void> {
    if (this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is already running`);
    const proc = await DetachedProcess.spawn(process.execPath, [SCRIPT, '--id', this.id, '--state-dir', this.stateDir], {
      logFile: this.log,
      what: 'the launcher',
    });
    this.proc = proc;
    void proc.exited.then((e) => this.onGone(e));
    // Running the guest, for this backend, is listening on its ports (the launcher says so).
    const deadline = Date.now() + 10_000;
    while (!existsSync(path.join(this.stateDir, 'running'))) {
      if (proc.hasExited || signal?.aborted || Date.now() > deadline) {
        proc.kill('SIGKILL');
        if (signal?.aborted) throw new AegisError('CANCELLED', `start of VM ${this.id} cancelled`);
        throw new AegisError('UNAVAILABLE', `the launcher did not start: ${(await fileTail(this.log, 512)).trim() || 'no agent socket'}`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** libkrun's way: the launcher process is the VM, so stopping it stops the guest. */
  async pause(): Promise<void> {
    this.requireRunning().kill('SIGSTOP');
  }

  async resume(): Promise<void> {
    this.requireRunning().kill('SIGCONT');
  }

  connectAgent(signal?: AbortSignal): Promise<Duplex> {
    return this.connect('agent.sock', 'agent', signal);
  }

  connectData(signal?: AbortSignal): Promise<Duplex> {
    return this.connect('data.sock', 'data', signal);
  }

  private connect(name: string, what: string, signal?: AbortSignal): Promise<Duplex> {
    this.requireRunning();
    return connectSocket(path.join(this.stateDir, name), what, this.id, signal);
  }

  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const proc = this.proc;
    if (!proc) return;
    this.stopRequested = true;
    // A paused (stopped) process does not act on SIGTERM until continued.
    proc.kill('SIGCONT');
    await proc.stop({ timeoutMs: options.timeoutMs ?? 3000, ...(options.signal ? { signal: options.signal } : {}) });
    if (!this.detached) await this.exited;
  }

  detach(): void {
    this.detached = true;
    this.proc?.release();
  }

  async consoleTail(maxBytes = 4096): Promise<string> {
    return fileTail(this.log, maxBytes);
  }

  private onGone({ code, signal, statusKnown }: ProcessExit): void {
    if (this.detached) return;
    let exit: VmExit;
    if (this.stopRequested) exit = { reason: 'host-stop', detail: 'stopped by the host' };
    else if (!statusKnown) exit = { reason: 'killed', detail: 'the launcher ended (started by an earlier daemon: its status is not ours)' };
    else if (signal) exit = { reason: 'killed', detail: `the launcher was killed by ${signal}` };
    else if (code !== 0) exit = { reason: 'vmm-error', detail: `the launcher exited with status ${code}` };
    else exit = { reason: 'guest-poweroff', detail: 'the guest powered off' };
    this.resolveExit(exit);
  }

  private requireRunning(): DetachedProcess {
    if (!this.proc || this.proc.hasExited) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is not running`);
    return this.proc;
  }
}

/** What the registry loads (`AEGIS_BACKEND_MODULES`) or a test registers. */
export const backends: BackendEntry[] = [{ name: LAUNCHER_BACKEND, create: () => new LauncherBackend() }];
