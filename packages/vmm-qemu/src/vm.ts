/**
 * One QEMU VM: starting it (with passt, and restoring a snapshot), pause / resume / snapshot
 * over QMP, the agent and data channels (virtio-serial ports on unix sockets), why it ended,
 * and taking it over again after a daemon restart (its record).
 */
import { promises as fs } from 'node:fs';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';
import {
  connectSocket,
  DetachedProcess,
  Passt,
  type ProcessExit,
  type ProcessIdentity,
  type Vm,
  type VmExit,
  type VmRecord,
} from '@aegis/vmm';
import { QmpClient, type QmpEvent } from './qmp.js';
import { CONSOLE_RING, CONSOLE_RING_BYTES, paths, shellSafe } from './args.js';

interface QemuRecord extends ProcessIdentity {
  backend: 'qemu';
  id: string;
  stateDir: string;
}

export function parseRecord(record: VmRecord): QemuRecord | undefined {
  const r = record as Partial<QemuRecord>;
  if (r.backend !== 'qemu' || typeof r.pid !== 'number' || typeof r.id !== 'string' || typeof r.stateDir !== 'string') return undefined;
  return {
    backend: 'qemu',
    id: r.id,
    pid: r.pid,
    stateDir: r.stateDir,
    ...(typeof r.startTicks === 'number' ? { startTicks: r.startTicks } : {}),
  };
}

/** A reused pid is not our VM: QEMU's command line names the VM (`-name aegis-<id>,`). */
export const isOurQemu =
  (id: string) =>
  (argv: string[]): boolean =>
    argv.some((a) => a.startsWith(`aegis-${id},`));

export class QemuVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  private proc: DetachedProcess | undefined;
  private qmp: QmpClient | undefined;
  private shutdownEvent: QmpEvent | undefined;
  private stopRequested = false;
  private detached = false;
  /** Why the backend ended the VM itself (a KVM internal error). */
  private failure: string | undefined;
  private readonly p: ReturnType<typeof paths>;

  constructor(
    readonly id: string,
    private readonly stateDir: string,
    private readonly launch:
      { binary: string; args: string[]; kvm: boolean; restoreFrom?: string; ramInFile: boolean; userNetwork: boolean } | undefined,
  ) {
    this.p = paths(stateDir, id);
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
  }

  hostPid(): number | undefined {
    return this.proc?.pid;
  }

  record(): VmRecord {
    if (!this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const r: QemuRecord = { backend: 'qemu', id: this.id, ...this.proc.identity(), stateDir: this.stateDir };
    return { ...r };
  }

  async start(signal?: AbortSignal): Promise<void> {
    if (!this.launch || this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is already running`);
    // passt serves one client (`--one-off`): it exits with QEMU, so it needs no record of its own.
    const passt = this.launch.userNetwork ? await Passt.start(this.stateDir, this.id, signal) : undefined;
    const restoring = this.launch.restoreFrom !== undefined;
    const proc = await DetachedProcess.spawn(this.launch.binary, this.launch.args, { logFile: this.p.vmmLog, what: 'QEMU' }).catch(
      async (err: unknown) => {
        await passt?.kill();
        throw err;
      },
    );
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    try {
      await this.connectQmp(signal);
      if (restoring) await this.finishIncoming();
      if (this.launch.kvm) this.watchKvm();
    } catch (err) {
      proc.kill('SIGKILL');
      await passt?.kill();
      const tail = await fs.readFile(this.p.vmmLog, 'utf8').catch(() => '');
      throw new AegisError('UNAVAILABLE', `QEMU did not start: ${tail.trim().split('\n').slice(-3).join(' | ') || (err as Error).message}`);
    }
  }

  /** Waits for an incoming snapshot to be loaded, then lets the guest run. */
  private async finishIncoming(): Promise<void> {
    const qmp = this.requireQmp();
    if (this.launch?.ramInFile && this.launch.restoreFrom) {
      // RAM is the template's file, mapped copy-on-write: only device state is in the stream.
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
      await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellSafe(this.launch.restoreFrom)}` });
    }
    const deadline = Date.now() + 60_000;
    for (;;) {
      const st = (await qmp.execute('query-status')) as { status?: string };
      if (st.status !== 'inmigrate') break;
      if (Date.now() > deadline) throw new AegisError('TIMEOUT', 'restoring the snapshot took over 60 s');
      await new Promise((r) => setTimeout(r, 5));
    }
    const mig = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
    if (mig.status === 'failed') throw new AegisError('INTERNAL', `snapshot restore failed: ${mig['error-desc'] ?? 'unknown'}`);
    await qmp.execute('cont');
  }

  async saveSnapshot(file: string): Promise<void> {
    const qmp = this.requireQmp();
    await qmp.execute('stop');
    if (this.launch?.ramInFile) {
      // RAM already lives in its (shared) file: leave it there, save only device state.
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    }
    // QEMU 7.2 has no file: migration URI; exec:cat writes the stream to the file.
    await qmp.execute('migrate', { uri: `exec:cat > ${shellSafe(file)}` });
    for (;;) {
      const st = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
      if (st.status === 'completed') return;
      if (st.status === 'failed' || st.status === 'cancelled') {
        throw new AegisError('INTERNAL', `snapshot failed: ${st['error-desc'] ?? st.status}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /**
   * A KVM that fails in the middle of a VM's life (an internal error) stops the guest but not
   * QEMU, which then sits there, or spins. Watch the run state and end such a VM at once, so
   * the instance turns failed with the reason instead of hanging.
   */
  private watchKvm(): void {
    const check = async (): Promise<void> => {
      const qmp = this.qmp;
      if (!qmp || qmp.isClosed || this.detached || this.stopRequested) return;
      const st = (await qmp.execute('query-status').catch(() => ({}))) as { status?: string };
      if (st.status === 'internal-error' || st.status === 'guest-panicked') {
        this.failure =
          st.status === 'internal-error' ? 'KVM internal error: the hypervisor could not run the guest' : 'guest kernel panicked';
        this.proc?.kill('SIGKILL');
      }
    };
    // STOP arrives at once on an internal error; the poll is there for what sends no event.
    this.qmp?.on('event', (ev) => {
      if (ev.event === 'STOP' || ev.event === 'GUEST_PANICKED') void check();
    });
    const timer = setInterval(() => void check(), 1000);
    timer.unref();
    void this.exited.then(() => clearInterval(timer));
  }

  /** Takes over a QEMU process started by an earlier daemon (not our child: its pid is polled). */
  async adopt(proc: DetachedProcess): Promise<void> {
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    await this.connectQmp();
    const cmdline = await fs.readFile(`/proc/${proc.pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes('\0-accel\0kvm\0')) this.watchKvm();
  }

  private async connectQmp(signal?: AbortSignal): Promise<void> {
    const opts = signal ? { timeoutMs: 10_000, signal } : { timeoutMs: 10_000 };
    this.qmp = await QmpClient.connect(this.p.qmp, opts);
    this.qmp.on('event', (ev) => {
      if (ev.event === 'SHUTDOWN') this.shutdownEvent = ev;
    });
  }

  detach(): void {
    this.detached = true;
    this.proc?.release();
    this.qmp?.close();
  }

  private onProcessGone({ code, signal: sig }: ProcessExit): void {
    if (this.detached) return;
    this.qmp?.close();
    // passt has gone with QEMU (--one-off); its directory may be outside the state dir.
    void Passt.cleanup(this.p.netDir);
    const reason = String(this.shutdownEvent?.data?.['reason'] ?? '');
    let exit: VmExit;
    if (this.failure) exit = { reason: 'vmm-error', detail: this.failure };
    else if (this.stopRequested) exit = { reason: 'host-stop', detail: 'stopped by the host' };
    else if (reason === 'guest-reset' || reason === 'guest-shutdown')
      exit = { reason: 'guest-poweroff', detail: `guest ended the VM (${reason})` };
    else if (reason === 'guest-panic') exit = { reason: 'guest-panic', detail: 'guest kernel panicked' };
    else if (sig) exit = { reason: 'killed', detail: `QEMU was killed by ${sig}` };
    else if (code !== null && code !== 0) exit = { reason: 'vmm-error', detail: `QEMU exited with status ${code}` };
    else exit = { reason: 'killed', detail: 'QEMU process ended without a guest shutdown' };
    this.resolveExit(exit);
  }

  async pause(): Promise<void> {
    await this.requireQmp().execute('stop');
  }

  async resume(): Promise<void> {
    await this.requireQmp().execute('cont');
  }

  connectAgent(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(this.p.agent, 'agent', signal);
  }

  connectData(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(this.p.data, 'data', signal);
  }

  /** The data link's socket exists only for a VM made with `dataLink` (QEMU listens on it from its start). */
  async connectDataLink(signal?: AbortSignal): Promise<Duplex | undefined> {
    const exists = await fs.stat(this.p.dataLink).then(
      () => true,
      () => false,
    );
    return exists ? this.connectPort(this.p.dataLink, 'data link', signal) : undefined;
  }

  private connectPort(socketPath: string, what: string, signal?: AbortSignal): Promise<Duplex> {
    return connectSocket(socketPath, what, this.id, signal);
  }

  /** QMP `quit` (SIGTERM after `detach`), SIGKILL at the deadline whatever QMP does. */
  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const proc = this.proc;
    if (!proc) return;
    this.stopRequested = true;
    const qmp = this.detached ? undefined : this.qmp;
    await proc.stop({
      timeoutMs: options.timeoutMs ?? 3000,
      ...(options.signal ? { signal: options.signal } : {}),
      ...(qmp ? { ask: () => qmp.execute('quit') } : {}),
    });
    if (!this.detached) await this.exited;
  }

  /** The end of what the console ring holds (reading empties it: a tail is for reports). */
  async consoleTail(maxBytes = 4096): Promise<string> {
    try {
      const text = (await this.requireQmp().execute('ringbuf-read', {
        device: CONSOLE_RING,
        size: CONSOLE_RING_BYTES,
        format: 'utf8',
      })) as string;
      return typeof text === 'string' ? text.slice(-maxBytes) : '';
    } catch {
      return '';
    }
  }

  private requireQmp(): QmpClient {
    if (!this.qmp || this.qmp.isClosed) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is not running`);
    return this.qmp;
  }
}
