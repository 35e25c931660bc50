/**
 * A VMM backend with no VM, for unit tests of the instance lifecycle: each "VM" is an object
 * whose agent channel is served by a scripted harness in this process (JSON-RPC over an
 * in-memory duplex). Tests control when a boot completes, see which workloads ran, and drop
 * channels. It never stands in for a real VM in a test that claims a feature works.
 */
import { writeFileSync } from 'node:fs';
import { Duplex } from 'node:stream';
import { AegisError, RpcPeer } from '@aegis/protocol';
import type { Backend, Probe, StrayProcess, Vm, VmConfig, VmExit, VmRecord } from '@aegis/vmm';

/** Two connected in-memory byte streams (what one writes, the other reads); destroying one ends both. */
export function duplexPair(): [Duplex, Duplex] {
  const ends: Duplex[] = [];
  const make = (peerIndex: number): Duplex =>
    new Duplex({
      read() {},
      write(chunk: Buffer, _enc, cb) {
        const p = ends[peerIndex];
        if (p && !p.destroyed) p.push(chunk);
        cb();
      },
      destroy(err, cb) {
        const p = ends[peerIndex];
        if (p && !p.destroyed) p.destroy();
        cb(err);
      },
    });
  const a = make(1);
  const b = make(0);
  ends.push(a, b);
  return [a, b];
}

export class FakeVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  running = false;
  gone = false;
  /** Workloads the guest was asked to run. */
  readonly runs: string[][] = [];
  readonly execs: string[][] = [];
  /** The guest end of the current agent channel. */
  guest: { peer: RpcPeer; stream: Duplex } | undefined;
  paused = false;

  constructor(
    readonly id: string,
    private readonly backend: FakeBackend,
    readonly config: VmConfig,
  ) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }

  hostPid(): number | undefined {
    return undefined;
  }

  record(): VmRecord {
    return { backend: 'fake', id: this.id, pid: -1 };
  }

  async start(signal?: AbortSignal): Promise<void> {
    this.backend.events.push(`start ${this.id}`);
    if (this.config.restoreFrom !== undefined) {
      this.backend.events.push(`restore ${this.id}`);
      if (this.backend.failRestores) throw new AegisError('UNAVAILABLE', 'the snapshot does not restore');
    }
    // A boot the test holds open, as a slow TCG boot would be.
    await new Promise<void>((resolve, reject) => {
      const onAbort = (): void => reject(new AegisError('CANCELLED', 'start cancelled'));
      if (signal?.aborted) return onAbort();
      signal?.addEventListener('abort', onAbort, { once: true });
      void this.backend.bootGate.then(() => {
        signal?.removeEventListener('abort', onAbort);
        resolve();
      });
    });
    this.running = true;
  }

  async pause(): Promise<void> {
    this.paused = true;
  }

  async resume(): Promise<void> {
    this.paused = false;
  }

  async connectAgent(): Promise<Duplex> {
    if (!this.running) throw new AegisError('UNAVAILABLE', 'not running');
    const [host, guest] = duplexPair();
    const peer = new RpcPeer({
      send: (line) => void guest.write(line),
      onRequest: (method, params) => this.serve(method, params as Record<string, unknown>),
    });
    guest.on('data', (c: Buffer) => peer.receive(c));
    this.guest = { peer, stream: guest };
    setImmediate(() => peer.notify('ready', { version: 1 }));
    return host;
  }

  private async serve(method: string, params: Record<string, unknown>): Promise<unknown> {
    switch (method) {
      case 'health':
        return { version: 1, uptimeMs: 1, workload: null };
      case 'run':
        this.runs.push(params['command'] as string[]);
        this.backend.events.push(`run ${this.id}`);
        // A workload that exits at once: its exit reaches the host before the answer to `run`.
        if (this.backend.exitOnRun !== undefined) this.guest?.peer.notify('exit', { exitCode: this.backend.exitOnRun, signal: null });
        return { pid: 10, startedAtMs: Date.now() };
      case 'exec': {
        this.execs.push(params['command'] as string[]);
        // The warm pool's warm-up commands end at once, as they do in a real guest.
        const execId = String(params['execId']);
        if (execId.startsWith('warm-')) setImmediate(() => this.guest?.peer.notify('execExit', { execId, exitCode: 0, signal: null }));
        return { pid: 11 };
      }
      case 'fresh':
        this.backend.events.push(`fresh ${this.id}`);
        return {};
      case 'shutdown':
        setImmediate(() => this.end({ reason: 'guest-poweroff', detail: 'guest ended the VM' }));
        return {};
      default:
        return {};
    }
  }

  /** The guest end drops its channel while the VM lives. */
  dropAgent(): void {
    this.guest?.stream.destroy();
    this.guest = undefined;
  }

  async connectData(): Promise<Duplex> {
    return duplexPair()[0];
  }

  /** Writes the "snapshot" (and its RAM file, when the VM was made to write one). */
  async saveSnapshot(file: string): Promise<void> {
    this.paused = true;
    writeFileSync(file, `snapshot of ${this.id}\n`);
    const memory = this.config.snapshotMemory;
    if (memory?.access === 'write') writeFileSync(memory.path, `memory of ${this.id}\n`);
    this.backend.events.push(`snapshot ${this.id}`);
  }

  async stop(): Promise<void> {
    this.end({ reason: 'host-stop', detail: 'stopped by the host' });
    await this.exited;
  }

  end(exit: VmExit): void {
    if (this.gone) return;
    this.gone = true;
    this.running = false;
    this.guest?.stream.destroy();
    this.backend.events.push(`end ${this.id}`);
    this.resolveExit(exit);
  }

  /** As a real VM: the old handle's `exited` never resolves after this; `attach` hands out the VM again. */
  detach(): void {
    (this as { exited: Promise<VmExit> }).exited = new Promise((r) => (this.resolveExit = r));
  }

  async consoleTail(): Promise<string> {
    return '';
  }
}

export class FakeBackend implements Backend {
  readonly name = 'fake';
  readonly vms: FakeVm[] = [];
  readonly events: string[] = [];
  /** Every config `create` was given, in order. */
  readonly configs: VmConfig[] = [];
  private openGate!: () => void;
  bootGate: Promise<void> = Promise.resolve();
  /** Set: every workload exits with this status as soon as it is run. */
  exitOnRun: number | undefined;
  /** Set: restoring a snapshot fails (a template that no longer fits this VMM). */
  failRestores = false;

  /** `snapshots`: it saves and restores snapshots and clones disks (the warm paths). */
  constructor(readonly snapshots = false) {}

  /** Holds every boot until `releaseBoots`. */
  holdBoots(): void {
    this.bootGate = new Promise((r) => (this.openGate = r));
  }

  releaseBoots(): void {
    this.openGate();
  }

  async probe(): Promise<Probe> {
    return {
      available: true,
      detail: 'fake',
      capabilities: {
        pause: true,
        snapshot: this.snapshots,
        survivesDaemonRestart: false,
        agentTransport: 'virtio-serial',
        acceleration: 'tcg',
        networkModes: ['none'],
        diskClones: this.snapshots,
        volumeKinds: ['disk', 'share'],
        cpu: 'fake',
      },
    };
  }

  async create(config: VmConfig): Promise<Vm> {
    this.configs.push(config);
    const vm = new FakeVm(config.id, this, config);
    this.vms.push(vm);
    return vm;
  }

  /** A VM whose "VMM" still runs survives its daemon (a new daemon over the same backend finds it). */
  async attach(record: VmRecord): Promise<Vm> {
    const vm = this.vms.find((v) => v.id === record['id'] && v.running && !v.gone);
    if (!vm) throw new AegisError('NOT_FOUND', `VM ${String(record['id'])} is not running`);
    this.events.push(`attach ${vm.id}`);
    return vm;
  }

  async cloneDisk(base: string, file: string): Promise<void> {
    writeFileSync(file, `clone of ${base}\n`, { mode: 0o600 });
  }

  /** Its VMs are objects in this process: none can be left behind. */
  async strays(): Promise<StrayProcess[]> {
    return [];
  }

  /** VMs whose "VMM" still runs. */
  runningVms(): FakeVm[] {
    return this.vms.filter((v) => v.running && !v.gone);
  }
}
