/**
 * Instance lifecycle. Each instance has one owner: an operation queue (op-queue.ts) through
 * which every operation on it passes (start, stop, delete, pause, resume, restart, exec
 * admission), so they never interleave; a start in flight is cancelled by a stop or delete
 * queued behind it. State changes are compare-and-set against the state table (state.ts):
 * a refused operation is an error, and events from the VM (it exited, the workload exited)
 * take effect only from the states where they mean something.
 *
 * The pieces: spec.ts (requests, views, Docker's rules), boot.ts (disk + VM + agent),
 * live.ts (a running VM: agent events, execs, power-off), recovery.ts (after a restart),
 * templates.ts (warm boot). This file holds the owners and the operations.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError, exitStatus, type ExitEvent, type FileRequest, type PsResult } from '@aegis/protocol';
import type { Readable } from 'node:stream';
import type { Backend, NetworkMode, Vm, VmExit, VolumeKind } from '@aegis/vmm';
import type { DaemonConfig } from '../config.js';
import type { InstanceRow, InstanceSpec, Registry } from '../registry/db.js';
import type { Logger } from '../log.js';
import type { SecretStore } from '../secrets/store.js';
import { PortForwarder } from '../ports/forwarder.js';
import type { ImageService, ResolvedImage } from '../images/service.js';
import type { AgentConnection } from './agent.js';
import { LogStore } from './logs.js';
import { Deadlines } from './deadlines.js';
import { checkIdlePauseMs, IdleTimers, idleReason, isIdlePaused } from './idle.js';
import { allocatedBytes, cpuPercent, processMemoryBytes, sampleCpu, type ProcessSample } from './stats.js';
import { fileOp, type FileResult } from './files.js';
import type { MachineShape, TemplateCache } from './templates.js';
import { WarmPool, type PooledVm, type PoolStatus } from './pool.js';
import { OpQueue } from './op-queue.js';
import { LiveInstance, type ExecEmitter } from './live.js';
import { bootVm, freshIdentity, type BootContext } from './boot.js';
import { recover } from './recovery.js';
import { effectiveCommand, existingDisk, imageEnv, toView, type CreateRequest, type ExecRequest, type InstanceView } from './spec.js';
import { canTransition, isLive, requireState, type InstanceState } from './state.js';
import { VolumeService } from '../volumes/service.js';
import { checkMounts, normalTarget, type VolumeMount } from '../volumes/mounts.js';

export interface InstanceStats {
  id: string;
  handle: string;
  state: InstanceState;
  /** Of one CPU (200 = two busy CPUs); null when the VMM process cannot be read. */
  cpuPercent: number | null;
  vmmMemoryBytes: number | null;
  memoryLimitBytes: number;
  guestMemoryUsedBytes: number | null;
  guestMemoryTotalBytes: number | null;
  processes: number | null;
  diskUsedBytes: number | null;
  /** Paused because nobody used it (`--idle-pause`): the next use wakes it. */
  idlePaused?: boolean;
}

/** A file request as a caller gives it: which root (image or not) is the instance's to say. */
export type FileOpRequest = FileRequest extends infer R ? (R extends FileRequest ? Omit<R, 'image'> : never) : never;

export { toView, type CreateRequest, type ExecEvent, type ExecRequest, type InstanceView } from './spec.js';

/** Unix socket paths are limited to 107 bytes. */
const MAX_SOCKET_PATH = 107;
const RUN_TIMEOUT_MS = 30_000;
const DEFAULT_STOP_TIMEOUT_MS = 10_000;
/** At a deadline the workload gets this long after SIGTERM: the deadline is the user's limit, not a start of grace. */
const DEADLINE_STOP_TIMEOUT_MS = 1000;
/** Operations a stop or delete may cut short. */
const CANCELLABLE = ['start', 'restart'] as const;

/** How long a create waits for throwaway instances on their way out (see afterLeaving). */
const LEAVING_WAIT_MS = 15_000;

export class InstanceManager {
  private readonly live = new Map<string, LiveInstance>();
  private readonly owners = new Map<string, OpQueue>();
  private readonly deadlines = new Deadlines((id) => void this.deadlineReached(id));
  /** `--idle-pause`: when a running instance has gone unused for its idle time (idle.ts). */
  private readonly idle = new IdleTimers((id) => void this.idlePause(id));
  /** The last CPU sample of each instance's VMM, for `stats` (CPU since the previous call). */
  private readonly cpuSamples = new Map<string, ProcessSample>();

  constructor(
    private readonly config: DaemonConfig,
    private readonly registry: Registry,
    private readonly backend: Backend,
    private readonly log: Logger,
    private readonly secrets: SecretStore,
    private readonly templates: TemplateCache,
    /** What the backend can give a guest (its probe's capabilities). */
    private readonly networkModes: readonly NetworkMode[],
    private readonly images: ImageService,
    readonly volumes: VolumeService = new VolumeService(path.join(config.home, 'volumes'), registry, log),
    /** What kinds of volume the backend can attach (its probe's capabilities). */
    private readonly volumeKinds: readonly VolumeKind[] = ['disk', 'share'],
  ) {
    // Pooled VMs are restored from templates: no templates, no pool.
    if (config.poolSize > 0 && templates.enabled) {
      this.pool = new WarmPool({
        backend,
        templates,
        instancesDir: config.instancesDir,
        log,
        bootTimeoutMs: config.bootTimeoutMs,
        size: config.poolSize,
        memoryBudgetMiB: config.poolMemoryMiB,
        defaultShape: () => this.defaultShape(),
      });
    }
  }

  private readonly pool: WarmPool | undefined;

  /** The warm pool's state (undefined: no pool). */
  poolStatus(): PoolStatus | undefined {
    return this.pool?.status();
  }

  /** The machine an instance of these settings runs on (what templates and the pool are keyed by). */
  private async shapeOf(
    memoryMiB: number,
    vcpuCount: number,
    network: NetworkMode,
    image: ResolvedImage | undefined,
  ): Promise<MachineShape> {
    return {
      kernelPath: await fs.realpath(this.config.kernelPath),
      rootfsPath: await fs.realpath(this.config.rootfsPath),
      memoryMiB,
      vcpuCount,
      scratchDiskMiB: this.config.scratchDiskMiB,
      network,
      ...(image ? { imageDiskPath: image.fsPath } : {}),
    };
  }

  private defaultShape(): Promise<MachineShape> {
    return this.shapeOf(this.config.defaultMemoryMiB, this.config.defaultVcpuCount, this.defaultNetwork(), undefined);
  }

  /** Outbound network unless the backend cannot provide it (then the guest is offline). */
  private defaultNetwork(): NetworkMode {
    return this.networkModes.includes('user') ? 'user' : 'none';
  }

  /** The handle of a live instance running the image `digest`, if any (`image rm` asks). */
  userOfImage(digest: string): string | undefined {
    return this.registry.listInstances().find((r) => isLive(r.state) && r.image?.digest === digest)?.handle;
  }

  list(all: boolean): InstanceView[] {
    return this.registry
      .listInstances()
      .filter((r) => all || isLive(r.state))
      .map(toView);
  }

  get(ref: string): InstanceView {
    return toView(this.registry.resolveInstance(ref));
  }

  counts(): { total: number; running: number } {
    const rows = this.registry.listInstances();
    return { total: rows.length, running: rows.filter((r) => r.state === 'running').length };
  }

  private dirOf(id: string): string {
    return path.join(this.config.instancesDir, id);
  }

  private logsOf(id: string): LogStore {
    return this.live.get(id)?.logs ?? new LogStore(path.join(this.dirOf(id), 'output.ndjson'));
  }

  private ownerOf(id: string): OpQueue {
    let q = this.owners.get(id);
    if (!q) {
      q = new OpQueue();
      this.owners.set(id, q);
    }
    return q;
  }

  /** Resolves `ref` and runs `fn` as the instance's next operation, on its current row. */
  private async queued<T>(
    ref: string,
    op: string,
    fn: (row: InstanceRow, signal: AbortSignal) => Promise<T>,
    options: { cancels?: readonly string[]; signal?: AbortSignal } = {},
  ): Promise<T> {
    const { id } = this.registry.resolveInstance(ref);
    const owner = this.ownerOf(id);
    if (options.cancels) owner.cancel(options.cancels, `cancelled by ${op}`);
    return owner.run(
      op,
      (signal) => {
        // The row as it is now, after everything queued before us.
        const row = this.registry.getInstance(id);
        if (!row) throw new AegisError('NOT_FOUND', `instance ${ref} not found`);
        return fn(row, signal);
      },
      options.signal,
    );
  }

  /**
   * Compare-and-set: moves the instance from the state it is in now to `to`, if the table
   * allows it. False when refused; callers that cannot accept a refusal use `mustMove`.
   */
  private move(
    id: string,
    to: InstanceState,
    patch: Parameters<Registry['updateInstance']>[1] = {},
    from?: readonly InstanceState[],
  ): boolean {
    const row = this.registry.getInstance(id);
    if (!row || (from && !from.includes(row.state)) || !canTransition(row.state, to)) return false;
    if (!this.registry.transitionInstance(id, row.state, { ...patch, state: to })) return false;
    this.log.info(`instance ${row.handle} (${id}): ${row.state} -> ${to}${patch.stateReason ? ` (${patch.stateReason})` : ''}`);
    // Idle time counts only while it runs: from each start or wake, not across a pause.
    if (to === 'running' && row.spec.idlePauseMs) this.idle.arm(id, row.spec.idlePauseMs);
    else if (to !== 'running') this.idle.disarm(id);
    return true;
  }

  private mustMove(id: string, to: InstanceState, patch: Parameters<Registry['updateInstance']>[1] = {}): void {
    if (this.move(id, to, patch)) return;
    const row = this.registry.getInstance(id);
    throw new AegisError('FAILED_PRECONDITION', `instance "${row?.handle ?? id}" is ${row?.state ?? 'gone'}, it cannot become ${to}`);
  }

  async create(req: CreateRequest, signal?: AbortSignal): Promise<InstanceView> {
    await this.checkArtifacts();
    // Secrets are resolved first: an unknown name fails before anything exists. The values
    // live only in this request's memory and the guest's; the registry never sees them.
    const secretEnv = this.secrets.resolve(req.secrets ?? []);
    for (const k of Object.keys(secretEnv)) {
      if (req.env && Object.hasOwn(req.env, k)) {
        throw new AegisError('INVALID_ARGUMENT', `${k} is given both as an environment variable and as a secret`);
      }
    }
    if (req.network && !this.networkModes.includes(req.network)) {
      throw new AegisError(
        'UNSUPPORTED',
        `the ${this.backend.name} backend cannot give a guest network "${req.network}" here (aegis doctor)`,
      );
    }
    await this.afterLeaving(req);
    // Host directories checked and named volumes made (as Docker does) before anything binds.
    const mounts = await this.prepareMounts(req.volumes ?? []);
    // Host ports are bound first: a taken one fails the start before anything else exists.
    const forwarder = await PortForwarder.listen(
      (req.exposes ?? []).map((e) => ({
        guestPort: e.guestPort,
        hostPort: e.hostPort ?? 0,
        hostIp: e.hostIp ?? '127.0.0.1',
        protocol: 'tcp',
      })),
    );
    let row: InstanceRow;
    let image: ResolvedImage | undefined;
    let pooled: PooledVm | undefined;
    let shape: MachineShape | undefined;
    try {
      image = req.image !== undefined ? await this.images.resolve(req.image, signal) : undefined;
      // A ready VM of this shape, if the pool has one (an instance with volumes needs devices a
      // restored VM cannot gain). The instance takes its id: its files are already there.
      if (this.pool && mounts.length === 0) {
        shape = await this.shapeOf(
          req.memoryMiB ?? this.config.defaultMemoryMiB,
          req.vcpuCount ?? this.config.defaultVcpuCount,
          req.network ?? this.defaultNetwork(),
          image,
        );
        pooled = this.pool.take(shape);
      }
      row = this.insertRow(req, forwarder, image, mounts, pooled?.id);
    } catch (err) {
      if (pooled) this.pool?.giveBack(pooled);
      forwarder.close();
      throw err;
    }
    const env = { ...imageEnv(image?.config), ...req.env, ...secretEnv };
    const opts = { keepDisk: false, autoRemove: req.autoRemove === true };
    // A caller that asked for a throwaway instance and went away before learning its id
    // cannot delete it: we do.
    const abandoned = (): void => void this.delete(row.id, true).catch(() => undefined);
    if (opts.autoRemove) signal?.addEventListener('abort', abandoned, { once: true });
    try {
      return await this.ownerOf(row.id).run('start', (s) => this.launch(row, forwarder, image, env, { ...opts, pooled, shape }, s), signal);
    } catch (err) {
      // Cancelled before the start ran: the pooled VM it took was never followed.
      if (pooled && !this.live.has(row.id)) await pooled.vm.stop({ timeoutMs: 0 }).catch(() => undefined);
      throw err;
    } finally {
      signal?.removeEventListener('abort', abandoned);
    }
  }

  /**
   * A throwaway run returns at its workload's exit; its instance keeps its name, host ports and
   * volumes until its VM has stopped and it is removed, a second or two later. A request that
   * names any of those waits for such instances to be gone (bounded) instead of failing on what
   * is about to be free: `aegis run --name x …` twice in a row works as with Docker.
   */
  private async afterLeaving(req: CreateRequest): Promise<void> {
    const claims = req.handle !== undefined || (req.exposes ?? []).some((e) => e.hostPort) || (req.volumes?.length ?? 0) > 0;
    if (!claims) return;
    const leaving = (): boolean =>
      this.registry
        .listInstances()
        .some((r) => r.spec.autoRemove && r.exitCode !== null && (isLive(r.state) || Date.now() - (r.stoppedAt ?? 0) < LEAVING_WAIT_MS));
    const end = Date.now() + LEAVING_WAIT_MS;
    while (leaving() && Date.now() < end) await new Promise((r) => setTimeout(r, 50));
  }

  /**
   * The request's volumes as the instance will keep them: host directories resolved (they
   * must exist and be directories), named volumes created when missing.
   */
  private async prepareMounts(requested: NonNullable<CreateRequest['volumes']>): Promise<VolumeMount[]> {
    const mounts: VolumeMount[] = requested.map((m) => ({
      type: m.type,
      source: m.source,
      target: normalTarget(m.target) ?? m.target,
      readOnly: m.readOnly === true,
    }));
    checkMounts(mounts);
    for (const m of mounts) this.requireVolumeKind(m);
    for (const m of mounts) {
      if (m.type === 'bind') m.source = await this.hostDirectory(m.source);
      else await this.volumes.ensure(m.source);
    }
    return mounts;
  }

  private requireVolumeKind(m: VolumeMount): void {
    if (this.volumeKinds.includes(m.type === 'bind' ? 'share' : 'disk')) return;
    throw new AegisError(
      'UNSUPPORTED',
      m.type === 'bind'
        ? `the ${this.backend.name} backend cannot share a host directory (${m.source}); use a named volume`
        : `the ${this.backend.name} backend cannot attach named volumes`,
    );
  }

  /**
   * A host directory to share: it must exist and be a directory (9p exports directories),
   * symlinks resolved now, and it must not overlap what a guest must never reach: AEGIS_HOME
   * (registry, secrets key, VM disks), the guest kernel and rootfs every VM boots, and the
   * snapshot templates every clone maps.
   */
  private async hostDirectory(given: string): Promise<string> {
    let real: string;
    try {
      real = await fs.realpath(given);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new AegisError('NOT_FOUND', `host path ${given} does not exist`);
      throw new AegisError('INVALID_ARGUMENT', `host path ${given}: ${code ?? (err as Error).message}`);
    }
    if (!(await fs.stat(real)).isDirectory()) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `host path ${given} is not a directory: only directories can be shared (copy a file in with aegis cp)`,
      );
    }
    const resolved = (p: string): Promise<string> => fs.realpath(p).catch(() => path.resolve(p));
    const rootfs = await resolved(this.config.rootfsPath);
    const protectedDirs: [string, string][] = [
      ['AEGIS_HOME', await resolved(this.config.home)],
      ['the guest kernel', path.dirname(await resolved(this.config.kernelPath))],
      ['the guest rootfs', path.dirname(rootfs)],
      ['the snapshot templates', await resolved(this.config.templatesDir ?? path.join(path.dirname(path.dirname(rootfs)), 'templates'))],
    ];
    const inside = (a: string, b: string): boolean => a === b || a.startsWith(b.endsWith('/') ? b : `${b}/`);
    for (const [what, dir] of protectedDirs) {
      if (inside(real, dir) || inside(dir, real)) {
        throw new AegisError(
          'INVALID_ARGUMENT',
          `host path ${given} overlaps ${what} (${dir}): the daemon's own files are never shared with guests`,
        );
      }
    }
    return real;
  }

  /** Before a restart: the instance's host directories must still be there. */
  private async recheckMounts(mounts: readonly VolumeMount[]): Promise<void> {
    for (const m of mounts) {
      this.requireVolumeKind(m);
      if (m.type === 'bind' && (await this.hostDirectory(m.source)) !== m.source) {
        throw new AegisError('FAILED_PRECONDITION', `host path ${m.source} is now a symlink; it was shared as a directory`);
      }
    }
  }

  private insertRow(
    req: CreateRequest,
    forwarder: PortForwarder,
    image: ResolvedImage | undefined,
    mounts: VolumeMount[],
    /** A pooled VM's id, whose files are already in the instance's directory. */
    pooledId?: string,
  ): InstanceRow {
    const command = effectiveCommand(req.command, image?.config);
    const id = pooledId ?? randomBytes(8).toString('hex');
    const handle = req.handle ?? `i-${id.slice(0, 8)}`;
    const timeoutMs = req.timeoutMs ?? this.config.defaultTimeoutMs;
    const idlePauseMs = req.idlePauseMs ?? this.config.defaultIdlePauseMs;
    checkIdlePauseMs(idlePauseMs);
    if (path.join(this.dirOf(id), 'vm', 'agent.sock').length > MAX_SOCKET_PATH) {
      throw new AegisError('FAILED_PRECONDITION', `AEGIS_HOME ${this.config.home} is too long for unix socket paths; use a shorter one`);
    }
    const row: InstanceRow = {
      id,
      handle,
      state: 'starting',
      command,
      workdir: req.workdir ?? image?.config.workingDir ?? null,
      memoryMiB: req.memoryMiB ?? this.config.defaultMemoryMiB,
      vcpuCount: req.vcpuCount ?? this.config.defaultVcpuCount,
      backend: this.backend.name,
      vmRecord: null,
      exitCode: null,
      stateReason: null,
      createdAt: Date.now(),
      startedAt: null,
      stoppedAt: null,
      ports: forwarder.mappings,
      network: req.network ?? this.defaultNetwork(),
      image: image ? { ...(image.reference ? { reference: image.reference } : {}), digest: image.digest } : null,
      // For a restart. Secrets by name only: their values are looked up again then.
      spec: {
        env: req.env ?? {},
        secrets: req.secrets ?? [],
        ...(req.user !== undefined ? { user: req.user } : {}),
        ...(req.stdin ? { stdin: true } : {}),
        ...(req.tty ? { tty: req.tty } : {}),
        ...(req.labels ? { labels: req.labels } : {}),
        ...(timeoutMs > 0 ? { timeoutMs, deadlineAtMs: Date.now() + timeoutMs } : {}),
        ...(req.autoRemove ? { autoRemove: true } : {}),
        ...(idlePauseMs > 0 ? { idlePauseMs } : {}),
      },
      volumes: mounts,
    };
    // Checked and inserted with no await between: a second start of the same volume sees this row.
    this.volumes.checkAttach(mounts);
    this.registry.insertInstance(row);
    if (row.spec.deadlineAtMs !== undefined) this.deadlines.arm(id, row.spec.deadlineAtMs); // ALREADY_EXISTS for a taken handle, before any work
    this.log.info(`instance ${handle} (${id}): creating`);
    return row;
  }

  private bootContext(): BootContext {
    return {
      backend: this.backend,
      registry: this.registry,
      templates: this.templates,
      log: this.log,
      bootTimeoutMs: this.config.bootTimeoutMs,
      track: (id, handle, vm) => this.track(id, handle, vm),
    };
  }

  /**
   * Boots the instance's VM (warm when a template fits and the disk is new), serves its ports,
   * and starts its workload. Runs as the instance's `start`/`restart` operation: when its
   * signal aborts (a stop or delete behind it), whatever it booted is ended before it returns,
   * so nothing boots or runs afterwards.
   */
  private async launch(
    row: InstanceRow,
    forwarder: PortForwarder,
    image: ResolvedImage | undefined,
    env: Record<string, string>,
    /** `shape`: the create worked it out already (to look in the pool). */
    options: { keepDisk: boolean; autoRemove: boolean; pooled?: PooledVm | undefined; shape?: MachineShape | undefined },
    signal: AbortSignal,
  ): Promise<InstanceView> {
    const { id, handle } = row;
    const dir = this.dirOf(id);
    const { pooled } = options;
    try {
      await fs.mkdir(path.join(dir, 'vm'), { recursive: true, mode: 0o700 });
      const shape = options.shape ?? (await this.shapeOf(row.memoryMiB, row.vcpuCount, row.network, image));
      // A restart keeps the instance's disk (its writes), so it boots cold on that disk. So does
      // an instance with volumes: a machine restored from a template cannot gain devices.
      const volumes = this.volumes.vmVolumes(row.volumes);
      const template = pooled || options.keepDisk || volumes.length > 0 ? undefined : this.templates.lookup(shape);
      let booted: Awaited<ReturnType<typeof bootVm>>;
      try {
        booted = pooled
          ? await this.fromPool(row, pooled, signal)
          : await bootVm(this.bootContext(), { id, handle, dir, shape, template, keepDisk: options.keepDisk, volumes }, signal);
      } catch (err) {
        if ((!template && !pooled) || signal.aborted) throw err;
        // A template or pooled VM that fails must not break instances: set it aside, boot cold.
        this.log.warn(`instance ${handle} (${id}): ${pooled ? 'pooled VM' : 'warm boot'} failed (${(err as Error).message}); booting cold`);
        const failed = this.live.get(id);
        if (failed) {
          failed.retired = true;
          await failed.kill();
        } else await pooled?.vm.stop({ timeoutMs: 0 }).catch(() => undefined);
        if (template) await this.templates.discard(template);
        this.registry.updateInstance(id, { vmRecord: null });
        booted = await bootVm(this.bootContext(), { id, handle, dir, shape, volumes }, signal);
      }
      signal.throwIfAborted();
      this.serve(booted.live, forwarder);
      const params = {
        command: row.command,
        env,
        ...(row.workdir ? { workdir: row.workdir } : {}),
        ...(row.spec.user !== undefined ? { user: row.spec.user } : {}),
        ...(row.spec.stdin ? { stdin: true } : {}),
        ...(row.spec.tty ? { tty: row.spec.tty } : {}),
        ...(image ? { image: image.config.user ? { user: image.config.user } : {} } : {}),
      };
      await booted.agent.call('run', params, { timeoutMs: RUN_TIMEOUT_MS, signal });
      // The workload runs. A workload that exits at once (or a VM that died) has moved the
      // instance on already; that is its state, not a refusal to report.
      this.move(id, 'running', { startedAt: Date.now() }, ['starting']);
      return this.get(id);
    } catch (err) {
      const cancelled = signal.aborted;
      const e = cancelled ? AegisError.from(signal.reason ?? err, 'CANCELLED') : AegisError.from(err);
      // Whatever booted is ended before this operation returns.
      const live = this.live.get(id);
      const tail = e.code === 'TIMEOUT' && live ? await live.vm.consoleTail(1500) : '';
      this.log.warn(
        `instance ${handle} (${id}): start ${cancelled ? 'cancelled' : 'failed'}: ${e.message}${tail ? `\n--- console ---\n${tail}` : ''}`,
      );
      this.move(
        id,
        cancelled ? 'stopped' : 'failed',
        { stateReason: cancelled ? `stopped while starting (${e.message})` : `start failed: ${e.message}`, stoppedAt: Date.now() },
        ['starting'],
      );
      if (live) await live.kill();
      forwarder.close();
      if (options.autoRemove && !cancelled) await this.removeNow(id);
      throw e;
    }
  }

  /**
   * Makes a pooled VM this instance's: followed as any instance's VM, with the pool's agent
   * channel handed over before the guest runs again (nothing it says is lost), then resumed
   * and given its identity before any of the instance's own work reaches it.
   */
  private async fromPool(row: InstanceRow, pooled: PooledVm, signal: AbortSignal): Promise<Awaited<ReturnType<typeof bootVm>>> {
    const t0 = Date.now();
    this.registry.updateInstance(row.id, { vmRecord: pooled.vm.record() });
    const live = this.track(row.id, row.handle, pooled.vm);
    live.adoptAgent(pooled.agent);
    await pooled.vm.resume();
    const resumedMs = Date.now() - t0;
    await pooled.agent.call('fresh', freshIdentity(row.handle), { timeoutMs: 15_000, signal });
    if (!live.agent) throw new AegisError('UNAVAILABLE', 'agent channel closed during start');
    this.log.info(`instance ${row.handle} (${row.id}): from the warm pool, ms: resumed ${resumedMs}, fresh ${Date.now() - t0}`);
    return { live, agent: pooled.agent };
  }

  /**
   * `docker restart`: stops the instance if it runs, then boots a new VM for it with the same
   * command, environment (secrets resolved again by name), image, network and host ports, on
   * its own disk, so what it wrote survives. Logs continue in the same store.
   */
  restart(ref: string, signal?: AbortSignal): Promise<InstanceView> {
    return this.queued(
      ref,
      'restart',
      async (row, opSignal) => {
        if (isLive(row.state)) {
          await this.stopNow(row, DEFAULT_STOP_TIMEOUT_MS);
          row = this.registry.resolveInstance(row.id);
        }
        requireState(row.handle, row.state, ['stopped', 'failed'], 'restart');
        const secretEnv = this.secrets.resolve(row.spec.secrets);
        const image = row.image ? this.images.resolveDigest(row.image.digest) : undefined;
        if (row.network === 'user' && !this.networkModes.includes('user')) {
          throw new AegisError('UNSUPPORTED', `the ${this.backend.name} backend cannot give this instance its network here`);
        }
        await this.recheckMounts(row.volumes);
        const forwarder = await PortForwarder.listen(row.ports);
        try {
          // No await between the check and the move: see insertRow.
          this.volumes.checkAttach(this.registry.resolveInstance(row.id).volumes, row.id);
          this.mustMove(row.id, 'starting', { exitCode: null, stateReason: null, startedAt: null, stoppedAt: null });
        } catch (err) {
          forwarder.close();
          throw err;
        }
        this.log.info(`instance ${row.handle} (${row.id}): restarting`);
        if (row.spec.timeoutMs !== undefined) this.setDeadline(row, row.spec.timeoutMs);
        const env = { ...imageEnv(image?.config), ...row.spec.env, ...secretEnv };
        return this.launch(row, forwarder, image, env, { keepDisk: true, autoRemove: false }, opSignal);
      },
      signal ? { signal } : {},
    );
  }

  /** Builds the warm-boot template for the default machine shape, then fills the pool, in the background. */
  async warmUp(): Promise<void> {
    try {
      await this.templates.ensure(await this.defaultShape());
    } catch {
      // no artifacts yet: instances will say so
    }
    this.pool?.start();
  }

  /** Ends the pool's VMs (daemon shutdown). */
  async closePool(): Promise<void> {
    await this.pool?.close();
  }

  private async checkArtifacts(): Promise<void> {
    for (const [what, file] of [
      ['guest kernel', this.config.kernelPath],
      ['base rootfs', this.config.rootfsPath],
    ] as const) {
      try {
        await fs.access(file);
      } catch {
        throw new AegisError('FAILED_PRECONDITION', `${what} not found at ${file}; build it with: make all`);
      }
    }
  }

  /** Forwards the instance's exposed ports over its VM's data channel for as long as it runs. */
  private serve(live: LiveInstance, forwarder: PortForwarder): void {
    live.forwarder = forwarder;
    forwarder.serve(
      () => live.vm.connectData(),
      (err) => this.log.warn(`instance ${live.handle}: port listener: ${err.message}`),
      {
        // A new connection to an idle-paused instance waits for it to wake (paused, as accepted).
        admit: () => (live.paused ? this.wake(live.id, 'a connection').then(() => undefined) : Promise.resolve()),
        // Bytes either way are use; bytes from the host on an open connection wake it (they wait in the channel).
        traffic: (fromHost) => {
          this.idle.touch(live.id);
          if (fromHost && live.paused) void this.wake(live.id, 'a connection').catch(() => undefined);
        },
      },
    );
  }

  /** Starts following a VM: its exit, and (once connected) its agent. */
  private track(id: string, handle: string, vm: Vm): LiveInstance {
    const live = new LiveInstance(
      id,
      handle,
      vm,
      new LogStore(path.join(this.dirOf(id), 'output.ndjson')),
      {
        onWorkloadExit: (l, exit) => this.onWorkloadExit(l, exit),
        onVmExit: (l, exit) => this.onVmExit(l, exit),
      },
      this.log,
    );
    this.live.set(id, live);
    // Output of the workload or an exec is use (`--idle-pause`).
    live.logs.on('entry', () => this.idle.touch(id));
    return live;
  }

  private onWorkloadExit(live: LiveInstance, ev: ExitEvent): void {
    const code = exitStatus(ev);
    this.registry.updateInstance(live.id, { exitCode: code });
    // From starting (it exited before `run` answered), running or paused; a stop already on its way keeps its reason.
    const reason = `workload exited with status ${code}`;
    this.move(live.id, 'stopping', { stateReason: reason }, ['starting', 'running', 'paused']);
    // Its status is known now: `run` returns while the VM powers off behind it.
    live.logs.workloadExited({ state: 'stopping', exitCode: code, stateReason: reason });
    void live.powerOff(1000);
  }

  private onVmExit(live: LiveInstance, exit: VmExit): void {
    if (this.live.get(live.id) === live) this.live.delete(live.id);
    if (live.retired) return;
    const row = this.registry.getInstance(live.id);
    if (row && isLive(row.state)) {
      const clean = live.exit !== undefined || row.state === 'stopping' || exit.reason === 'host-stop';
      // A VM that ended under a paused instance (nobody stopped it through `stop`, which
      // resumes first) did not stop cleanly from the user's point of view: failed, with why.
      const to: InstanceState = clean && canTransition(row.state, 'stopped') ? 'stopped' : 'failed';
      const reason = clean ? (row.stateReason ?? exit.detail) : `VM ended unexpectedly: ${exit.detail}`;
      if (!this.move(live.id, to, { stoppedAt: Date.now(), stateReason: reason, vmRecord: null })) {
        this.log.warn(`instance ${live.handle}: VM exit not recorded: ${row.state} -> ${to} refused`);
      }
    }
    const after = this.registry.getInstance(live.id);
    live.logs.end({
      state: after?.state ?? 'stopped',
      exitCode: after?.exitCode ?? null,
      ...(after?.stateReason ? { stateReason: after.stateReason } : {}),
    });
    // A throwaway instance (`run`'s) is removed once it stops, whoever stopped it: `run` has
    // returned already, and this also holds when nobody is left to ask.
    if (after?.spec.autoRemove && !isLive(after.state)) void this.delete(live.id, true).catch(() => undefined);
  }

  private requireLive(row: InstanceRow, op: string): LiveInstance {
    const live = this.live.get(row.id);
    if (!live) throw new AegisError('FAILED_PRECONDITION', `cannot ${op} instance "${row.handle}": its VM is not running`);
    return live;
  }

  /** Stops the instance; a start in flight is cancelled first (nothing boots afterwards). */
  stop(ref: string, timeoutMs = DEFAULT_STOP_TIMEOUT_MS, reason = 'stopped by request'): Promise<InstanceView> {
    return this.queued(
      ref,
      'stop',
      async (row) => {
        await this.stopNow(row, timeoutMs, reason);
        return this.get(row.id);
      },
      { cancels: CANCELLABLE },
    );
  }

  /** Within an operation: ends the instance's VM, the workload first given `timeoutMs`. */
  private async stopNow(row: InstanceRow, timeoutMs: number, reason = 'stopped by request'): Promise<void> {
    if (!isLive(row.state)) return; // like docker stop: nothing to do
    const live = this.live.get(row.id);
    if (!live) {
      this.move(row.id, 'failed', { stateReason: 'VM was not found', stoppedAt: Date.now(), vmRecord: null });
      return;
    }
    // A frozen VMM never answers `cont`: don't let that hold the stop past its deadline.
    if (row.state === 'paused') {
      await Promise.race([live.vm.resume().catch(() => undefined), new Promise((r) => setTimeout(r, 1000))]);
      live.resumed();
    }
    this.move(row.id, 'stopping', { stateReason: reason }, ['running', 'paused', 'starting']);
    await live.powerOff(timeoutMs);
  }

  /** Deletes the instance; with `force` a live one is stopped first (a start in flight cancelled). */
  async delete(ref: string, force: boolean): Promise<void> {
    const first = this.registry.resolveInstance(ref);
    if (isLive(first.state) && !force) {
      throw new AegisError('FAILED_PRECONDITION', `instance "${first.handle}" is ${first.state}; stop it first or delete with --force`);
    }
    await this.queued(
      first.id,
      'delete',
      async (row) => {
        if (isLive(row.state)) {
          if (!force) {
            throw new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" is ${row.state}; stop it first or delete with --force`);
          }
          await this.stopNow(row, 2000);
        }
        await this.removeNow(row.id);
      },
      force ? { cancels: CANCELLABLE } : {},
    );
  }

  /** Removes a stopped instance's files and row; later operations on it find nothing. */
  private async removeNow(id: string): Promise<void> {
    const row = this.registry.getInstance(id);
    if (!row) return;
    const live = this.live.get(id);
    if (live) await live.kill(); // never leave a VM without its row
    await fs.rm(this.dirOf(id), { recursive: true, force: true });
    this.registry.deleteInstance(id);
    this.deadlines.clear(id);
    this.cpuSamples.delete(id);
    this.owners.get(id)?.close(new AegisError('NOT_FOUND', `instance "${row.handle}" was deleted`));
    this.owners.delete(id);
    this.log.info(`instance ${row.handle} (${id}): deleted`);
    void this.templates.collect().catch(() => undefined);
  }

  pause(ref: string): Promise<InstanceView> {
    return this.queued(ref, 'pause', async (row) => {
      if (isIdlePaused(row)) {
        // Paused already, for idleness: now the user's pause, which use does not wake.
        this.registry.updateInstance(row.id, { stateReason: null });
        return this.get(row.id);
      }
      requireState(row.handle, row.state, ['running'], 'pause');
      const live = this.requireLive(row, 'pause');
      await live.vm.pause();
      live.paused = true;
      this.mustMove(row.id, 'paused');
      return this.get(row.id);
    });
  }

  resume(ref: string): Promise<InstanceView> {
    return this.queued(ref, 'resume', async (row) => {
      requireState(row.handle, row.state, ['paused'], 'resume');
      const live = this.requireLive(row, 'resume');
      await live.vm.resume();
      this.mustMove(row.id, 'running', isIdlePaused(row) ? { stateReason: null } : {});
      live.resumed();
      return this.get(row.id);
    });
  }

  /** Runs a command in the instance, calling `emit` for each event; resolves after `exit`. */
  async exec(ref: string, req: ExecRequest, emit: ExecEmitter, signal?: AbortSignal): Promise<void> {
    const execId = randomBytes(6).toString('hex');
    // Admission is an operation of the instance (no stop can slip in between the check and
    // the guest starting the command); the command's output then streams outside the queue.
    const { agent, done } = await this.queued(
      ref,
      'exec',
      async (queuedRow) => {
        const row = await this.wakeNow(queuedRow, 'exec');
        const agent = this.runningAgent(row, 'exec in');
        const live = this.requireLive(row, 'exec in');
        const done = live.trackExec(execId, emit);
        done.catch(() => undefined); // observed below; not an unhandled rejection meanwhile
        // An exec in progress is use, however quiet (`--idle-pause`).
        const release = this.idle.hold(row.id);
        void done.then(release, release);
        try {
          // In an image, exec runs as `docker exec` does: the image's env, user and working directory.
          const image = row.image ? this.images.resolveDigest(row.image.digest).config : undefined;
          const workdir = req.workdir ?? image?.workingDir;
          const params = {
            execId,
            command: req.command,
            // As docker exec: the instance's environment (image, --env, secrets looked up again
            // by name), then the exec's own.
            env: { ...imageEnv(image), ...row.spec.env, ...this.secrets.resolve(row.spec.secrets, { skipMissing: true }), ...req.env },
            ...(workdir ? { workdir } : {}),
            ...(req.user !== undefined ? { user: req.user } : {}),
            ...(image ? { image: image.user ? { user: image.user } : {} } : {}),
            ...(req.stdin ? { stdin: true } : {}),
            ...(req.tty ? { tty: req.tty } : {}),
          };
          await agent.call('exec', params, { timeoutMs: RUN_TIMEOUT_MS });
        } catch (err) {
          live.execs.delete(execId);
          throw err;
        }
        return { agent, done };
      },
      signal ? { signal } : {},
    );
    emit({ type: 'started', execId });
    const onAbort = (): void => {
      // The caller went away: don't leave its command running unseen, nor what it started.
      void agent.call('signal', { execId, signal: 'SIGKILL', group: true }, { timeoutMs: 5000 }).catch(() => undefined);
    };
    if (signal?.aborted) onAbort();
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await done;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  private runningAgent(row: InstanceRow, op: string): AgentConnection {
    requireState(row.handle, row.state, ['running'], op);
    const agent = this.requireLive(row, op).agent;
    if (!agent) throw new AegisError('UNAVAILABLE', `agent of instance "${row.handle}" is not connected`);
    return agent;
  }

  /** Sends a signal to the workload, or to one exec. */
  async signal(ref: string, signal: string, execId?: string): Promise<void> {
    const agent = this.runningAgent(await this.wake(ref, 'a signal'), 'signal');
    await agent.call('signal', execId === undefined ? { signal } : { execId, signal }, { timeoutMs: 10_000 });
  }

  /** Resizes the terminal of the workload (no execId) or of an exec. */
  async resize(ref: string, execId: string | undefined, rows: number, cols: number): Promise<void> {
    const agent = this.runningAgent(await this.wake(ref, 'a terminal resize'), 'resize a terminal in');
    await agent.call('resize', { ...(execId !== undefined ? { execId } : {}), rows, cols }, { timeoutMs: 10_000 });
  }

  /** Feeds the stdin of the workload (no execId) or of an exec: base64 `data`, then optionally end of file. */
  async input(ref: string, execId: string | undefined, data: string | undefined, eof: boolean): Promise<void> {
    const agent = this.runningAgent(await this.wake(ref, 'input'), 'write to');
    const params = { ...(execId !== undefined ? { execId } : {}), ...(data !== undefined ? { data } : {}), ...(eof ? { eof: true } : {}) };
    await agent.call('stdin', params, { timeoutMs: 30_000 });
  }

  /**
   * One operation of the guest's file service (files API, `aegis cp`), in the instance's root
   * (its image's when it has one). The instance must be running: a paused guest cannot answer.
   */
  async files(ref: string, req: FileOpRequest, body?: Readable, signal?: AbortSignal): Promise<FileResult> {
    // In progress until its bytes are through: not idle meanwhile (`--idle-pause`), and woken first.
    const release = this.idle.hold(this.registry.resolveInstance(ref).id);
    try {
      const row = await this.wake(ref, 'files');
      requireState(row.handle, row.state, ['running'], 'reach the files of');
      const forwarder = this.requireLive(row, 'reach the files of').forwarder;
      if (!forwarder) throw new AegisError('UNAVAILABLE', `instance "${row.handle}" is not serving its data channel yet`);
      const result = await fileOp(() => forwarder.open(0), { ...req, image: row.image !== null } as FileRequest, body, signal);
      // However the transfer ends (the VM going closes it too).
      for (const ev of ['close', 'end', 'error']) result.data.once(ev, release);
      return result;
    } catch (err) {
      release();
      throw err;
    }
  }

  /**
   * What the instance costs and uses (`docker stats`): CPU of its VMM process since the last
   * call (or over a short sample on the first), the VMM's memory (PSS), its scratch disk's
   * allocated bytes, and the guest's own memory and process count (absent while paused).
   */
  async stats(ref: string): Promise<InstanceStats> {
    const row = this.registry.resolveInstance(ref);
    requireState(row.handle, row.state, ['running', 'paused'], 'measure');
    const live = this.requireLive(row, 'measure');
    const pid = live.vm.hostPid();
    let cpu: number | null = null;
    if (pid !== undefined) {
      let before = this.cpuSamples.get(row.id);
      if (!before) {
        before = await sampleCpu(pid);
        await new Promise((r) => setTimeout(r, 250));
      }
      const now = await sampleCpu(pid);
      if (before && now) {
        cpu = cpuPercent(before, now);
        this.cpuSamples.set(row.id, now);
      }
    }
    const disk = await existingDisk(this.dirOf(row.id));
    const guest =
      row.state === 'running' && live.agent ? await live.agent.call('stats', {}, { timeoutMs: 5000 }).catch(() => undefined) : undefined;
    return {
      id: row.id,
      handle: row.handle,
      state: row.state,
      cpuPercent: cpu,
      vmmMemoryBytes: pid !== undefined ? ((await processMemoryBytes(pid)) ?? null) : null,
      memoryLimitBytes: row.memoryMiB * 1024 * 1024,
      guestMemoryUsedBytes: guest ? (guest.memTotalKiB - guest.memAvailableKiB) * 1024 : null,
      guestMemoryTotalBytes: guest ? guest.memTotalKiB * 1024 : null,
      processes: guest ? guest.processes : null,
      diskUsedBytes: disk ? ((await allocatedBytes(disk.path)) ?? null) : null,
      ...(isIdlePaused(row) ? { idlePaused: true } : {}),
    };
  }

  /** The guest's processes (`docker top`). */
  async top(ref: string): Promise<PsResult> {
    const agent = this.runningAgent(await this.wake(ref, 'top'), 'list the processes of');
    return agent.call('ps', {}, { timeoutMs: 10_000 });
  }

  /** Resolves once the instance is stopped or failed (`docker wait`), with how it ended. */
  async wait(ref: string, signal?: AbortSignal): Promise<{ state: InstanceState; exitCode: number | null; stateReason?: string }> {
    const id = this.registry.resolveInstance(ref).id;
    for (;;) {
      const row = this.registry.getInstance(id);
      if (!row) throw new AegisError('NOT_FOUND', `instance ${ref} was deleted while waited for`);
      if (!isLive(row.state)) {
        return { state: row.state, exitCode: row.exitCode, ...(row.stateReason ? { stateReason: row.stateReason } : {}) };
      }
      // Woken by the VM's end; the poll covers a start that has no VM yet, and a restart.
      const store = this.live.get(id)?.logs;
      await new Promise<void>((resolve, reject) => {
        const done = (): void => {
          clearTimeout(timer);
          store?.off('end', done);
          signal?.removeEventListener('abort', gone);
          resolve();
        };
        const gone = (): void => {
          done();
          reject(new AegisError('CANCELLED', 'the caller went away'));
        };
        const timer = setTimeout(done, 500);
        store?.once('end', done);
        signal?.addEventListener('abort', gone, { once: true });
      });
    }
  }

  /** The log store of an instance plus whether more output can still come. */
  logs(ref: string): { row: InstanceRow; store: LogStore; live: boolean } {
    const row = this.registry.resolveInstance(ref);
    const live = this.live.get(row.id);
    return { row, store: this.logsOf(row.id), live: live !== undefined && isLive(row.state) };
  }

  /**
   * `--idle-pause`: the instance went unused for its idle time. Paused as the user's `pause`
   * does, through its queue, after looking again (a use may have come while this waited).
   */
  private async idlePause(id: string): Promise<void> {
    try {
      await this.queued(id, 'idle-pause', async (row) => {
        const live = this.live.get(id);
        if (row.state !== 'running' || !live || !row.spec.idlePauseMs) return;
        if (!this.idle.isIdle(id)) return this.idle.reschedule(id);
        await live.vm.pause();
        live.paused = true;
        if (!this.move(id, 'paused', { stateReason: idleReason(row.spec.idlePauseMs) }, ['running'])) {
          // The workload exited (or the VM went) meanwhile: that is its state; let it run to its end.
          await live.vm.resume().catch(() => undefined);
          live.resumed();
        }
      });
    } catch (err) {
      const e = AegisError.from(err);
      if (e.code !== 'NOT_FOUND') this.log.warn(`instance ${id}: idle pause failed: ${e.message}`);
    }
  }

  /** Within an operation: resumes an idle-paused instance (`why` woke it); any other row is returned as it is. */
  private async wakeNow(row: InstanceRow, why: string): Promise<InstanceRow> {
    if (!isIdlePaused(row)) return row;
    const live = this.requireLive(row, 'wake');
    const started = Date.now();
    await live.vm.resume();
    this.mustMove(row.id, 'running', { stateReason: null });
    live.resumed();
    this.log.info(`instance ${row.handle} (${row.id}): woken by ${why} in ${Date.now() - started} ms`);
    return this.registry.resolveInstance(row.id);
  }

  /**
   * Resumes the instance if it is idle-paused (several wakers at once queue behind one resume
   * and find it running); a user's pause is left alone. Use either way: its idle time restarts.
   */
  async wake(ref: string, why: string): Promise<InstanceRow> {
    const row = this.registry.resolveInstance(ref);
    this.idle.touch(row.id);
    if (!isIdlePaused(row)) return row;
    return this.queued(row.id, 'wake', (current) => this.wakeNow(current, why));
  }

  /** Keeps the instance from pausing for idleness until the returned function is called (an attached `run`). */
  holdAwake(id: string): () => void {
    return this.idle.hold(id);
  }

  /** Finds VMs left running by an earlier daemon and takes them over; ends any no instance owns. */
  async recover(): Promise<void> {
    await recover({
      registry: this.registry,
      backend: this.backend,
      log: this.log,
      instancesDir: this.config.instancesDir,
      move: (id, to, patch) => this.move(id, to, patch),
      adopt: (row, vm) => this.adopt(row, vm),
    });
    // What a pooled VM left when its daemon died (its VMM was ended above): a directory no row names.
    for (const name of await fs.readdir(this.config.instancesDir).catch(() => [] as string[])) {
      if (/^[0-9a-f]{16}$/.test(name) && !this.registry.getInstance(name)) {
        await fs.rm(path.join(this.config.instancesDir, name), { recursive: true, force: true });
      }
    }
    for (const row of this.registry.listInstances()) {
      // Deadlines outlive the daemon: one that passed while it was down fires now.
      if (isLive(row.state) && row.spec.deadlineAtMs !== undefined) this.deadlines.arm(row.id, row.spec.deadlineAtMs);
      // A throwaway instance that stopped while no daemon was there to remove it.
      if (!isLive(row.state) && row.spec.autoRemove) await this.delete(row.id, true).catch(() => undefined);
      // Idle time starts again with the new daemon; an idle-paused one stays paused until used.
      if (row.state === 'running' && row.spec.idlePauseMs) this.idle.arm(row.id, row.spec.idlePauseMs);
    }
  }

  /** Sets a live instance's deadline `timeoutMs` from now (0: none), as `aegis instance extend`. */
  extend(ref: string, timeoutMs: number): InstanceView {
    const row = this.registry.resolveInstance(ref);
    requireState(row.handle, row.state, ['starting', 'running', 'paused'], 'set the deadline of');
    this.setDeadline(row, timeoutMs);
    return this.get(row.id);
  }

  private setDeadline(row: InstanceRow, timeoutMs: number): void {
    const spec: InstanceSpec = { ...row.spec };
    if (timeoutMs > 0) spec.deadlineAtMs = Date.now() + timeoutMs;
    else delete spec.deadlineAtMs;
    this.registry.setInstanceSpec(row.id, spec);
    row.spec = spec;
    if (spec.deadlineAtMs !== undefined) this.deadlines.arm(row.id, spec.deadlineAtMs);
    else this.deadlines.clear(row.id);
  }

  /**
   * The workload gets SIGTERM (and the usual grace before SIGKILL), the VM stops; a throwaway
   * instance is then deleted, as its creator would have done had it still been there.
   */
  private async deadlineReached(id: string): Promise<void> {
    const row = this.registry.getInstance(id);
    if (!row || !isLive(row.state) || row.spec.deadlineAtMs === undefined || row.spec.deadlineAtMs > Date.now()) return;
    this.log.info(`instance ${row.handle} (${id}): deadline reached; stopping it`);
    try {
      await this.stop(id, DEADLINE_STOP_TIMEOUT_MS, `deadline reached (--timeout ${row.spec.timeoutMs ?? 0} ms)`);
      if (row.spec.autoRemove) await this.delete(id, true);
    } catch (err) {
      this.log.warn(`instance ${row.handle}: stop at its deadline failed: ${(err as Error).message}`);
    }
  }

  /**
   * Takes over a VM an earlier daemon started. Its agent is connected in the background: the
   * daemon serves requests at once, however many guests are slow to answer. A paused guest
   * cannot answer at all: its channel is connected without waiting, and checked on resume.
   */
  private async adopt(row: InstanceRow, vm: Vm): Promise<void> {
    const live = this.track(row.id, row.handle, vm);
    live.paused = row.state === 'paused';
    // The same host ports as before (connections that were open did not survive), and the data
    // channel the files API uses, ports or not.
    await PortForwarder.listen(row.ports).then(
      (f) => this.serve(live, f),
      async (err: unknown) => {
        this.log.warn(`instance ${row.handle}: ports not restored: ${(err as Error).message}`);
        this.serve(live, await PortForwarder.listen([]));
      },
    );
    void (async () => {
      try {
        await live.connectAgent(15_000);
        this.log.info(`instance ${row.handle} (${row.id}): reattached (${row.state})`);
        if (row.state === 'stopping') await live.powerOff(1000);
      } catch (err) {
        this.log.warn(`instance ${row.handle}: agent did not answer after reattach: ${(err as Error).message}`);
        if (!live.paused) await live.powerOff(1000);
      }
    })();
  }

  /** Lets go of every VM without stopping it: the next daemon takes them over. */
  detachAll(): void {
    this.deadlines.clearAll();
    this.idle.clearAll();
    for (const live of this.live.values()) live.detach();
    this.live.clear();
  }
}
