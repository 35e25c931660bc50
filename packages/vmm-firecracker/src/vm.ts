/**
 * One Firecracker VM: its process (started, or adopted after a daemon restart), booting or
 * restoring it over the API, pause / resume / snapshot, the agent and data channels over vsock,
 * the bound on its console log, and why it ended.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';
import {
  fileTail,
  DetachedProcess,
  type ProcessExit,
  type ProcessIdentity,
  type Vm,
  type VmConfig,
  type VmExit,
  type VmRecord,
} from '@aegis/vmm';
import { FirecrackerApi } from './api.js';
import type { SpawnVmm } from './backend.js';
import { AGENT_VSOCK_PORT, DATA_VSOCK_PORT, bootRequests, paths, restoreMemoryPath, restoreRequest, snapshotMemoryPath } from './config.js';
import { CONSOLE_CHECK_MS, trimConsoleLog } from './console.js';
import { connectVsock } from './vsock.js';

/** Snapshots write or map all of guest RAM; 10 s is not enough for a large guest on a slow disk. */
const SNAPSHOT_TIMEOUT_MS = 300_000;

interface FirecrackerRecord extends ProcessIdentity {
  backend: 'firecracker';
  id: string;
  stateDir: string;
  /** The file a later `saveSnapshot` writes RAM to (`snapshotMemory` with `write`), when the VM has one. */
  memoryFile?: string;
}

export function parseRecord(record: VmRecord): FirecrackerRecord | undefined {
  const r = record as Partial<FirecrackerRecord>;
  if (r.backend !== 'firecracker' || typeof r.pid !== 'number' || typeof r.id !== 'string' || typeof r.stateDir !== 'string') {
    return undefined;
  }
  return {
    backend: 'firecracker',
    id: r.id,
    pid: r.pid,
    stateDir: r.stateDir,
    ...(typeof r.startTicks === 'number' ? { startTicks: r.startTicks } : {}),
    ...(typeof r.memoryFile === 'string' ? { memoryFile: r.memoryFile } : {}),
  };
}

/** A reused pid is not our VM: the process must carry this VM's `--id` and API socket. */
export const isOurFirecracker =
  (id: string, stateDir: string) =>
  (args: string[]): boolean => {
    const after = (flag: string): string | undefined => {
      const i = args.indexOf(flag);
      return i >= 0 ? args[i + 1] : undefined;
    };
    return after('--id') === id && after('--api-sock') === paths(stateDir).api;
  };

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

export interface Launch {
  binary: string;
  spawn?: SpawnVmm;
  config: VmConfig;
  connectTimeoutMs: number;
}

export class FirecrackerVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  private proc: DetachedProcess | undefined;
  /** Keeps firecracker.log bounded while this object is attached (`watchConsole`). */
  private consoleWatch: NodeJS.Timeout | undefined;
  private trimming = false;
  private started = false;
  private gone = false;
  private stopRequested = false;
  private detached = false;
  private readonly api: FirecrackerApi;
  private readonly p: ReturnType<typeof paths>;
  private readonly connectTimeoutMs: number;
  private readonly snapshotMemory: VmConfig['snapshotMemory'];

  constructor(
    readonly id: string,
    private readonly stateDir: string,
    private readonly launch: Launch | undefined,
    adopted?: { connectTimeoutMs: number; snapshotMemory: VmConfig['snapshotMemory'] },
  ) {
    this.p = paths(stateDir);
    this.api = new FirecrackerApi(this.p.api);
    this.connectTimeoutMs = launch?.connectTimeoutMs ?? adopted?.connectTimeoutMs ?? 60_000;
    this.snapshotMemory = launch ? launch.config.snapshotMemory : adopted?.snapshotMemory;
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
  }

  hostPid(): number | undefined {
    return this.proc?.pid;
  }

  record(): VmRecord {
    if (!this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const r: FirecrackerRecord = {
      backend: 'firecracker',
      id: this.id,
      ...this.proc.identity(),
      stateDir: this.stateDir,
      ...(this.snapshotMemory?.access === 'write' ? { memoryFile: this.snapshotMemory.path } : {}),
    };
    return { ...r };
  }

  async start(signal?: AbortSignal): Promise<void> {
    if (!this.launch || this.started) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is already running`);
    if (signal?.aborted) throw new AegisError('CANCELLED', `start of VM ${this.id} cancelled`);
    this.started = true;
    const { binary, config } = this.launch;
    // Left behind by an earlier run in this directory (SIGKILL leaves them): Firecracker
    // refuses to bind over an existing API socket, and a restored vsock device the same.
    await fs.rm(this.p.api, { force: true });
    await fs.rm(this.p.vsock, { force: true });
    // The supervisor opens the log O_APPEND, which is what makes `trimConsoleLog` safe: after
    // we truncate the file, Firecracker's writes go to its new end.
    const proc = await DetachedProcess.spawn(binary, ['--api-sock', this.p.api, '--id', this.id], {
      logFile: this.p.log,
      cwd: this.stateDir,
      what: 'Firecracker',
      ...(this.launch.spawn ? { spawn: this.launch.spawn } : {}),
    });
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    this.watchConsole();
    try {
      await this.waitForApi(signal);
      if (config.restoreFrom) {
        const load = restoreRequest(config.restoreFrom, restoreMemoryPath(config) ?? '');
        await this.api.put(load.path, load.body, { signal, timeoutMs: SNAPSHOT_TIMEOUT_MS });
      } else {
        for (const req of bootRequests(config)) await this.api.put(req.path, req.body, { signal });
        await this.api.put('/actions', { action_type: 'InstanceStart' }, { signal });
      }
    } catch (err) {
      proc.kill('SIGKILL');
      if (err instanceof AegisError && err.code === 'CANCELLED') throw err;
      // Let Firecracker's last words reach the log before we read it.
      await Promise.race([this.exited, sleep(200)]);
      const tail = await this.logTail(2048);
      const lastWords = tail.trim().split('\n').slice(-3).join(' | ');
      throw new AegisError('UNAVAILABLE', `Firecracker did not start: ${(err as Error).message}${lastWords ? ` (log: ${lastWords})` : ''}`);
    }
  }

  /** The API socket appears shortly after exec; wait until it answers. */
  private async waitForApi(signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (signal?.aborted) throw new AegisError('CANCELLED', `start of VM ${this.id} cancelled`);
      try {
        await this.api.get('/', { timeoutMs: 1000, ...(signal ? { signal } : {}) });
        return;
      } catch (err) {
        if (err instanceof AegisError && err.code === 'CANCELLED') throw err;
        if (this.gone) throw new AegisError('UNAVAILABLE', 'Firecracker exited before its API socket answered');
        if (Date.now() > deadline) throw new AegisError('UNAVAILABLE', `API socket ${this.p.api} did not answer within 10 s`);
      }
      await sleep(5);
    }
  }

  /**
   * Takes over a Firecracker process started by an earlier daemon. It is not our child, so
   * there is no 'exit' event and no HTTP connection that stays open: the supervisor polls the pid.
   */
  adopt(proc: DetachedProcess): void {
    this.proc = proc;
    this.started = true;
    void proc.exited.then((e) => this.onProcessGone(e));
    this.watchConsole();
  }

  /**
   * Bounds firecracker.log while this object is attached (started or adopted, not detached):
   * the guest writes it, through Firecracker's stdout, as fast as it likes. Checked at once (an
   * adopted VM's log may have grown while no daemon was attached), then every second. What
   * remains: nothing watches it while no daemon is attached (between a detach and the next
   * attach, e.g. across a daemon restart), so it can grow until one attaches again; that attach
   * trims it at once.
   */
  private watchConsole(): void {
    if (this.consoleWatch || this.gone || this.detached) return;
    void this.trimConsole();
    this.consoleWatch = setInterval(() => void this.trimConsole(), CONSOLE_CHECK_MS);
    this.consoleWatch.unref();
  }

  private stopConsoleWatch(): void {
    if (this.consoleWatch) clearInterval(this.consoleWatch);
    this.consoleWatch = undefined;
  }

  private async trimConsole(): Promise<void> {
    if (this.trimming || this.gone || this.detached) return;
    this.trimming = true;
    try {
      await trimConsoleLog(this.p.log);
    } finally {
      this.trimming = false;
    }
  }

  detach(): void {
    this.detached = true;
    this.proc?.release();
    this.stopConsoleWatch();
  }

  private onProcessGone({ code, signal }: ProcessExit): void {
    if (this.gone) return;
    this.gone = true;
    this.stopConsoleWatch();
    if (this.detached) return;
    this.resolveExit(this.exitReason(code, signal));
  }

  /**
   * Why the VM ended, decided only from what the guest cannot forge: our own stop request and
   * the process's exit status or signal. Never from firecracker.log: it is also the guest's
   * serial console, where a guest can print any "Firecracker exiting ... exit_code=" line or
   * "Kernel panic" it likes. What that costs:
   * - status 0 is a guest reset (reboot=k), and a kernel panic ends in the same reset
   *   (panic=-1): the two look alike from here, so both are a guest reset;
   * - a process adopted from an earlier aegisd is not our child and its status is not ours to
   *   read, so its end is reported as such, whatever its console says.
   */
  private exitReason(code: number | null, sig: NodeJS.Signals | null): VmExit {
    if (this.stopRequested) return { reason: 'host-stop', detail: 'stopped by the host' };
    if (sig) return { reason: 'killed', detail: `Firecracker was killed by ${sig}` };
    if (code === null) {
      return { reason: 'killed', detail: 'Firecracker ended with an exit status aegisd cannot read (it was started by an earlier aegisd)' };
    }
    if (code !== 0) return { reason: 'vmm-error', detail: `Firecracker exited with status ${code}` };
    return { reason: 'guest-poweroff', detail: 'guest ended the VM (a reset: poweroff, reboot or kernel panic)' };
  }

  async pause(signal?: AbortSignal): Promise<void> {
    await this.requireApi().patch('/vm', { state: 'Paused' }, { ...(signal ? { signal } : {}) });
  }

  async resume(signal?: AbortSignal): Promise<void> {
    await this.requireApi().patch('/vm', { state: 'Resumed' }, { ...(signal ? { signal } : {}) });
  }

  /** A Full snapshot: device state to `file`, all of RAM to `snapshotMemoryPath` (see there). */
  async saveSnapshot(file: string, signal?: AbortSignal): Promise<void> {
    const api = this.requireApi();
    const opts = signal ? { signal } : {};
    await api.patch('/vm', { state: 'Paused' }, opts);
    const snapshotPath = path.resolve(file);
    const memPath = snapshotMemoryPath(this.snapshotMemory, snapshotPath);
    await api.put(
      '/snapshot/create',
      { snapshot_type: 'Full', snapshot_path: snapshotPath, mem_file_path: memPath },
      { ...opts, timeoutMs: SNAPSHOT_TIMEOUT_MS },
    );
  }

  connectAgent(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(AGENT_VSOCK_PORT, 'agent', signal);
  }

  connectData(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(DATA_VSOCK_PORT, 'data', signal);
  }

  /**
   * Firecracker refuses a CONNECT until the guest listens on the port, which is only after it
   * has booted: keep trying while the VM runs, up to `connectTimeoutMs`.
   */
  private async connectPort(port: number, what: string, signal?: AbortSignal): Promise<Duplex> {
    if (!this.started) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const deadline = Date.now() + this.connectTimeoutMs;
    for (;;) {
      if (this.gone) throw new AegisError('UNAVAILABLE', `${what} channel of VM ${this.id}: the VM has exited`);
      try {
        return await connectVsock(this.p.vsock, port, { timeoutMs: 5000, ...(signal ? { signal } : {}) });
      } catch (err) {
        if (err instanceof AegisError && err.code === 'CANCELLED') throw new AegisError('CANCELLED', `${what} channel connect cancelled`);
        if (Date.now() > deadline) {
          throw new AegisError('UNAVAILABLE', `${what} channel of VM ${this.id}: ${(err as Error).message}`);
        }
      }
      await sleep(20);
    }
  }

  /**
   * Firecracker has no "quit": SendCtrlAltDel (x86_64 only) makes the guest kernel reset, and
   * the reset ends Firecracker; a guest without the i8042 driver, or a paused one, ignores it,
   * and SIGKILL follows after `timeoutMs`.
   */
  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const proc = this.proc;
    if (!proc || this.gone) return;
    // After detach nothing watched the pid: the supervisor checks it is still this VM's first.
    this.stopRequested = true;
    const timeoutMs = options.timeoutMs ?? 3000;
    const ctrlAltDel = (): Promise<unknown> =>
      this.api.put('/actions', { action_type: 'SendCtrlAltDel' }, { timeoutMs: Math.min(timeoutMs, 1000) });
    await proc.stop({
      timeoutMs,
      // Elsewhere than x86_64 there is no graceful way: the deadline's SIGKILL ends it.
      ask: process.arch === 'x64' ? ctrlAltDel : () => undefined,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (this.detached) this.gone = true;
    else await this.exited;
  }

  /** The end of firecracker.log; trimming keeps its last CONSOLE_KEEP_BYTES or more. */
  async consoleTail(maxBytes = 4096): Promise<string> {
    return this.logTail(maxBytes);
  }

  private logTail(maxBytes: number): Promise<string> {
    return fileTail(this.p.log, maxBytes);
  }

  private requireApi(): FirecrackerApi {
    if (!this.started || this.gone) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is not running`);
    return this.api;
  }
}
