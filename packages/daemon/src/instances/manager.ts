/**
 * The directory of instances: admission of new ones (everything a create checks and binds
 * before an instance exists), the list, the warm pool, and what a new daemon finds. Each
 * instance owns itself (instance.ts): every operation on one goes through its `Instance`,
 * which callers get from `instance(ref)`.
 *
 * The pieces: spec.ts (requests, views, Docker's rules), instance.ts (the owner: queue,
 * lifecycle, VM events), boot.ts (shape, disk + VMM), live.ts (a running VM: agent events,
 * execs, power-off), recovery.ts (stray VMMs after a restart), templates.ts and pool.ts (warm
 * boot), volumes/host-mounts.ts (`-v`), stats.ts (`docker stats`).
 */
import { EventBus } from '../events/bus.js';
import { DaemonMetrics, type InstanceFigures } from '../metrics.js';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { NetworkMode } from '@aegis/protocol/api';
import type { Backend, NetworkMode as VmNetwork, VolumeKind } from '@aegis/vmm';
import { parseRules } from '../egress/rules.js';
import { networkModes } from './network.js';
import type { DaemonConfig } from '../config.js';
import type { InstanceRow, Registry } from '../registry/db.js';
import type { Logger } from '../log.js';
import type { SecretStore } from '../secrets/store.js';
import { PortForwarder } from '../ports/forwarder.js';
import type { ImageService, ResolvedImage } from '../images/service.js';
import { checkIdlePauseMs } from './idle.js';
import type { MachineShape, TemplateCache } from './templates.js';
import { WarmPool, type PooledVm, type PoolStatus } from './pool.js';
import { machineShape } from './boot.js';
import { Instance } from './instance.js';
import type { InstanceServices } from './owner.js';
import { endStrays } from './recovery.js';
import { effectiveCommand, imageEnv, toView, type CreateRequest, type InstanceView } from './spec.js';
import { isLive, isUp } from './state.js';
import { restoreMismatch } from './machine.js';
import { SnapshotStore, type SnapshotMeta } from '../snapshots/store.js';
import { VolumeService } from '../volumes/service.js';
import { HostMounts } from '../volumes/host-mounts.js';
import type { VolumeMount } from '../volumes/mounts.js';

export { toView, type CreateRequest, type ExecEvent, type ExecRequest, type InstanceView } from './spec.js';
export type { Instance } from './instance.js';
export type { FileOpRequest } from './owner.js';
export type { InstanceStats } from './stats.js';

/** Unix socket paths are limited to 107 bytes. */
const MAX_SOCKET_PATH = 107;
/** How long a create waits for throwaway instances on their way out (see afterLeaving). */
const LEAVING_WAIT_MS = 15_000;

export class InstanceManager {
  /** The owner of each instance this daemon has touched, by id; an owner leaves once its instance is removed. */
  private readonly owners = new Map<string, Instance>();
  private readonly services: InstanceServices;
  private readonly networkModes: readonly NetworkMode[];
  private readonly pool: WarmPool | undefined;
  readonly snapshots: SnapshotStore;
  /** Lifecycle events of every instance (`aegis events`). */
  readonly events: EventBus;
  /** `/metrics`: its histograms are observed by the instances, its figures read from them. */
  readonly metrics = new DaemonMetrics();

  constructor(
    private readonly config: DaemonConfig,
    private readonly registry: Registry,
    private readonly backend: Backend,
    private readonly log: Logger,
    private readonly secrets: SecretStore,
    templates: TemplateCache,
    /** What the backend can give a guest (its probe's capabilities). */
    backendNetworks: readonly VmNetwork[],
    private readonly images: ImageService,
    readonly volumes: VolumeService = new VolumeService(path.join(config.home, 'volumes'), registry, log),
    /** What kinds of volume the backend can attach (its probe's capabilities). */
    volumeKinds: readonly VolumeKind[] = ['disk', 'share'],
  ) {
    const mounts = new HostMounts(config, volumes, backend.name, volumeKinds);
    this.networkModes = networkModes(backendNetworks);
    this.snapshots = new SnapshotStore(path.join(config.home, 'snapshots'));
    this.events = new EventBus(registry);
    this.services = {
      config,
      registry,
      backend,
      log,
      secrets,
      templates,
      images,
      volumes,
      mounts,
      networkModes: this.networkModes,
      snapshots: this.snapshots,
      events: this.events,
      metrics: this.metrics,
    };
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

  /** The owner of the instance `ref` names (a handle, an id, a unique id prefix); NOT_FOUND when none does. */
  instance(ref: string): Instance {
    return this.ownerOf(this.registry.resolveInstance(ref).id);
  }

  private ownerOf(id: string): Instance {
    let owner = this.owners.get(id);
    if (!owner) {
      const made = new Instance(id, this.services);
      void made.removed.then(() => {
        if (this.owners.get(id) === made) this.owners.delete(id);
        void this.dropUnusedForkSnapshots();
      });
      this.owners.set(id, made);
      owner = made;
    }
    return owner;
  }

  /** The warm pool's state (undefined: no pool). */
  /** What `/metrics` reads of each instance (undefined: it is gone). */
  async figures(id: string): Promise<InstanceFigures | undefined> {
    if (!this.registry.getInstance(id)) return undefined;
    return this.ownerOf(id).figures();
  }

  poolStatus(): PoolStatus | undefined {
    return this.pool?.status();
  }

  private defaultShape(): Promise<MachineShape> {
    return machineShape(this.config, this.config.defaultMemoryMiB, this.config.defaultVcpuCount, this.defaultNetwork(), undefined);
  }

  /** Outbound network under the egress policy: every backend can carry it (its data channel). */
  private defaultNetwork(): NetworkMode {
    return 'user';
  }

  /** The handle of a live instance running the image `digest`, if any (`image rm` asks). */
  userOfImage(digest: string): string | undefined {
    return this.registry.listInstances().find((r) => isUp(r.state) && r.image?.digest === digest)?.handle;
  }

  list(all: boolean): InstanceView[] {
    return this.registry
      .listInstances()
      .filter((r) => all || isLive(r.state) || r.state === 'hibernated')
      .map(toView);
  }

  get(ref: string): InstanceView {
    return toView(this.registry.resolveInstance(ref));
  }

  counts(): { total: number; running: number } {
    const rows = this.registry.listInstances();
    return { total: rows.length, running: rows.filter((r) => r.state === 'running').length };
  }

  /**
   * Admits a new instance: secrets, network, volumes, host ports and image are checked (and
   * bound) before it exists, so a bad request leaves nothing behind; then its owner starts it.
   */
  async create(req: CreateRequest, signal?: AbortSignal): Promise<InstanceView> {
    if (req.snapshot !== undefined) return this.createFromSnapshot(req, req.snapshot, signal);
    await this.checkArtifacts();
    // Secrets are resolved first: an unknown name fails before anything exists. The values
    // live only in this request's memory and the guest's; the registry never sees them.
    const network = req.network ?? this.defaultNetwork();
    // Checked before anything exists: names known, and a secret bound to hosts only where it can be brokered.
    const secretNames = Object.keys(this.secrets.environment(req.secrets ?? [], 'admission', network === 'user').env);
    for (const k of secretNames) {
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
    if (req.egress && network !== 'user') {
      throw new AegisError('INVALID_ARGUMENT', `egress rules need the default network (user); this instance's is ${network}`);
    }
    parseRules(req.egress?.allow ?? [], 'allow');
    parseRules(req.egress?.deny ?? [], 'deny');
    await this.afterLeaving(req);
    // Host directories checked and named volumes made (as Docker does) before anything binds.
    const mounts = await this.services.mounts.prepare(req.volumes ?? []);
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
        shape = await machineShape(
          this.config,
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
    const owner = this.ownerOf(row.id);
    owner.armFromRow();
    // Its first operation: nothing can be queued before it. A caller that goes away cancels it.
    // Values, or the placeholders of secrets brokered at egress (derived from the instance's id).
    const secretEnv = this.secrets.environment(req.secrets ?? [], row.id, network === 'user').env;
    return owner.start({ forwarder, image, env: { ...imageEnv(image?.config), ...req.env, ...secretEnv }, pooled, shape }, signal);
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

  private insertRow(
    req: CreateRequest,
    forwarder: PortForwarder,
    image: ResolvedImage | undefined,
    mounts: VolumeMount[],
    /** A pooled VM's id, whose files are already in the instance's directory. */
    pooledId?: string,
    /** Started from this snapshot: its machine and workload are the snapshot's. */
    from?: SnapshotMeta,
  ): InstanceRow {
    const command = from ? from.instance.command : effectiveCommand(req.command, image?.config);
    const id = pooledId ?? randomBytes(8).toString('hex');
    const handle = req.handle ?? `i-${id.slice(0, 8)}`;
    const timeoutMs = req.timeoutMs ?? this.config.defaultTimeoutMs;
    const idlePauseMs = req.idlePauseMs ?? this.config.defaultIdlePauseMs;
    checkIdlePauseMs(idlePauseMs);
    const idleHibernateMs = req.idleHibernateMs ?? 0;
    checkIdlePauseMs(idleHibernateMs, 'idleHibernateMs');
    if (idleHibernateMs > 0 && idlePauseMs > 0 && idleHibernateMs <= idlePauseMs) {
      throw new AegisError('INVALID_ARGUMENT', 'idleHibernateMs must be longer than idlePauseMs: paused first, hibernated later');
    }
    if (path.join(path.join(this.config.instancesDir, id), 'vm', 'agent.sock').length > MAX_SOCKET_PATH) {
      throw new AegisError('FAILED_PRECONDITION', `AEGIS_HOME ${this.config.home} is too long for unix socket paths; use a shorter one`);
    }
    const row: InstanceRow = {
      id,
      handle,
      state: 'starting',
      command,
      workdir: from ? from.instance.workdir : (req.workdir ?? image?.config.workingDir ?? null),
      memoryMiB: from?.machine.memoryMiB ?? req.memoryMiB ?? this.config.defaultMemoryMiB,
      vcpuCount: from?.machine.vcpuCount ?? req.vcpuCount ?? this.config.defaultVcpuCount,
      backend: this.backend.name,
      vmRecord: null,
      exitCode: null,
      stateReason: null,
      createdAt: Date.now(),
      startedAt: null,
      stoppedAt: null,
      ports: forwarder.mappings,
      network: from ? (from.instance.network as NetworkMode) : (req.network ?? this.defaultNetwork()),
      image: from
        ? from.instance.image
        : image
          ? { ...(image.reference ? { reference: image.reference } : {}), digest: image.digest }
          : null,
      // For a restart. Secrets by name only: their values are looked up again then.
      spec: {
        env: from?.instance.env ?? req.env ?? {},
        secrets: from?.instance.secrets ?? req.secrets ?? [],
        ...(from ? { snapshot: from.name, identityOf: from.instance.identityOf } : {}),
        ...(from?.instance.user !== undefined ? { user: from.instance.user } : {}),
        ...(req.user !== undefined ? { user: req.user } : {}),
        ...(req.stdin ? { stdin: true } : {}),
        ...(req.tty ? { tty: req.tty } : {}),
        ...(req.labels ? { labels: req.labels } : from?.instance.labels ? { labels: from.instance.labels } : {}),
        ...(timeoutMs > 0 ? { timeoutMs, deadlineAtMs: Date.now() + timeoutMs } : {}),
        ...(req.autoRemove ? { autoRemove: true } : {}),
        ...(idlePauseMs > 0 ? { idlePauseMs } : {}),
        ...(idleHibernateMs > 0 ? { idleHibernateMs } : {}),
        ...(!req.egress && from?.instance.egress ? { egress: from.instance.egress } : {}),
        ...(req.egress && (req.egress.allow?.length || req.egress.deny?.length || req.egress.privateRanges === 'never')
          ? {
              egress: {
                allow: req.egress.allow ?? [],
                deny: req.egress.deny ?? [],
                ...(req.egress.privateRanges === 'never' ? { privateRanges: 'never' as const } : {}),
              },
            }
          : {}),
      },
      volumes: mounts,
    };
    // Checked and inserted with no await between: a second start of the same volume sees this row.
    this.volumes.checkAttach(mounts);
    this.registry.insertInstance(row); // ALREADY_EXISTS for a taken handle, before any work
    this.log.info(`instance ${handle} (${id}): creating`);
    this.events.publish({
      type: 'create',
      instanceId: id,
      handle,
      state: row.state,
      ...(row.spec.labels ? { labels: row.spec.labels } : {}),
      ...(row.spec.snapshot ? { snapshot: row.spec.snapshot } : {}),
    });
    return row;
  }

  /**
   * A new instance resuming a snapshot: the snapshot's machine and workload, its own identity,
   * disk (a copy-on-write child of the snapshot's) and host ports. Everything is checked (the
   * snapshot's files whole, the VMM the same, its volumes free) before the instance exists.
   */
  private async createFromSnapshot(
    req: CreateRequest,
    name: string,
    signal?: AbortSignal,
    /** Written by this daemon a moment ago (a fork): its checksum need not be read again. */
    fresh = false,
  ): Promise<InstanceView> {
    const fixed = (
      ['command', 'image', 'env', 'secrets', 'memoryMiB', 'vcpuCount', 'network', 'volumes', 'user', 'workdir', 'stdin', 'tty'] as const
    ).filter((k) => req[k] !== undefined);
    if (fixed.length > 0) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `an instance started from a snapshot is the snapshot's machine, running its processes: ${fixed.join(', ')} cannot be given`,
      );
    }
    const snap = await this.snapshots.get(name);
    const mismatch = restoreMismatch(snap.meta.machine, this.services.templates.vmmIdentity());
    if (mismatch) throw new AegisError('FAILED_PRECONDITION', `snapshot "${name}" cannot be restored here: ${mismatch}`);
    await this.snapshots.verify(snap, { checksum: !fresh });
    if (req.egress && snap.meta.instance.network !== 'user') {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `egress rules need the default network (user); this snapshot's is ${snap.meta.instance.network}`,
      );
    }
    parseRules(req.egress?.allow ?? [], 'allow');
    parseRules(req.egress?.deny ?? [], 'deny');
    const mounts = snap.meta.instance.volumes;
    await this.services.mounts.recheck(mounts);
    const forwarder = await PortForwarder.listen(
      (req.exposes ?? snap.meta.instance.guestPorts.map((guestPort): NonNullable<CreateRequest['exposes']>[number] => ({ guestPort }))).map(
        (e) => ({ guestPort: e.guestPort, hostPort: e.hostPort ?? 0, hostIp: e.hostIp ?? '127.0.0.1', protocol: 'tcp' as const }),
      ),
    );
    let row: InstanceRow;
    let image: ResolvedImage | undefined;
    try {
      image = snap.meta.instance.image ? this.images.resolveDigest(snap.meta.instance.image.digest) : undefined;
      row = this.insertRow(req, forwarder, image, mounts, undefined, snap.meta);
    } catch (err) {
      forwarder.close();
      throw err;
    }
    const owner = this.ownerOf(row.id);
    owner.armFromRow();
    return owner.start({ forwarder, image, env: {}, checkpoint: snap }, signal);
  }

  /** `aegis fork`: a checkpoint of the instance, then `count` instances from it; all or none. */
  async fork(
    ref: string,
    count: number,
    options: { names?: string[] | undefined } & Pick<CreateRequest, 'timeoutMs' | 'autoRemove' | 'labels'>,
    signal?: AbortSignal,
  ): Promise<{ snapshot: string; instances: InstanceView[] }> {
    const { names, ...each } = options;
    if (names && names.length !== count) throw new AegisError('INVALID_ARGUMENT', `${names.length} names for ${count} forks`);
    const source = this.instance(ref);
    const handle = source.view().handle;
    // A name taken is refused before the checkpoint: a refusal leaves the source as it was.
    const taken = new Set(this.registry.listInstances().map((r) => r.handle));
    for (const [i, n] of (names ?? []).entries()) {
      if (taken.has(n) || names?.indexOf(n) !== i) {
        throw new AegisError('ALREADY_EXISTS', `an instance named "${n}" already exists; pick another --name or delete it`);
      }
    }
    const name = `${handle.slice(0, 80)}-fork-${randomBytes(4).toString('hex')}`;
    await source.checkpoint(name, true, signal);
    const made: InstanceView[] = [];
    try {
      for (let n = 0; n < count; n++) {
        const forkHandle = names?.[n] ?? `${handle.slice(0, 100)}-fork-${randomBytes(3).toString('hex')}`;
        made.push(await this.createFromSnapshot({ ...each, handle: forkHandle }, name, signal, true));
      }
    } catch (err) {
      for (const v of made)
        await this.instance(v.id)
          .delete(true)
          .catch(() => undefined);
      await this.dropUnusedForkSnapshots();
      throw err;
    }
    const after = this.registry.getInstance(source.id);
    this.events.publish({
      type: 'fork',
      instanceId: source.id,
      handle,
      ...(after?.spec.labels ? { labels: after.spec.labels } : {}),
      snapshot: name,
      forks: made.map((v) => v.handle),
    });
    return { snapshot: name, instances: made };
  }

  /**
   * `aegis rm`: the instance removed, and the fork checkpoint it was the last user of with it,
   * before the answer (a throwaway instance's goes when it is removed, in the background).
   */
  async deleteInstance(ref: string, force: boolean): Promise<void> {
    await this.instance(ref).delete(force);
    await this.dropUnusedForkSnapshots();
  }

  /** The handles of instances whose disk is a child of snapshot `name`'s. */
  snapshotDependents(name: string): string[] {
    return this.registry
      .listInstances()
      .filter((r) => r.spec.snapshot === name)
      .map((r) => r.handle);
  }

  async deleteSnapshot(name: string): Promise<void> {
    await this.snapshots.get(name).catch((err: unknown) => {
      // A damaged one can still be removed; only a missing one is NOT_FOUND.
      if (AegisError.from(err).code === 'NOT_FOUND') throw err;
    });
    const users = this.snapshotDependents(name);
    if (users.length > 0) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `snapshot "${name}" is the base of ${users.length === 1 ? 'instance' : 'instances'} ${users.join(', ')}: delete ${users.length === 1 ? 'it' : 'them'} first`,
      );
    }
    await this.snapshots.remove(name);
  }

  /** A fork's own checkpoint goes with the last instance started from it. */
  private async dropUnusedForkSnapshots(): Promise<void> {
    for (const snap of await this.snapshots.list()) {
      if (!snap.meta.auto || this.snapshotDependents(snap.meta.name).length > 0) continue;
      await this.snapshots.remove(snap.meta.name).catch(() => undefined);
    }
  }

  /** Builds the warm-boot template for the default machine shape, then fills the pool, in the background. */
  async warmUp(): Promise<void> {
    try {
      await this.services.templates.ensure(await this.defaultShape());
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

  /**
   * A new daemon: each instance takes over its VM if it still runs (or settles its row), VMM
   * processes no live instance owns are ended, and what pooled VMs of a dead daemon left is removed.
   */
  async recover(): Promise<void> {
    for (const row of this.registry.listInstances()) await this.ownerOf(row.id).recover();
    await endStrays({ registry: this.registry, backend: this.backend, instancesDir: this.config.instancesDir, log: this.log });
    // What a pooled VM left when its daemon died (its VMM was ended above): a directory no row names.
    for (const name of await fs.readdir(this.config.instancesDir).catch(() => [] as string[])) {
      if (/^[0-9a-f]{16}$/.test(name) && !this.registry.getInstance(name)) {
        await fs.rm(path.join(this.config.instancesDir, name), { recursive: true, force: true });
      }
    }
  }

  /** Lets go of every VM without stopping it: the next daemon takes them over. */
  detachAll(): void {
    for (const owner of this.owners.values()) owner.detach();
    this.owners.clear();
  }
}
