/**
 * Instance lifecycle: create (boot a VM, start the workload), exec, logs, pause/resume, stop,
 * delete, and finding running VMs again after a daemon restart. State lives in the registry;
 * this class holds only what cannot be stored (VM handles, agent connections, followers).
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError, exitStatus, type ExitEvent, type GuestEvents, type Stream } from '@aegis/protocol';
import type { Backend, NetworkMode, Vm, VmExit } from '@aegis/vmm';
import type { DaemonConfig } from '../config.js';
import type { InstanceRow, Registry } from '../registry/db.js';
import type { Logger } from '../log.js';
import type { SecretStore } from '../secrets/store.js';
import { PortForwarder, type PortMapping } from '../ports/forwarder.js';
import { AgentConnection } from './agent.js';
import { makeChildDisk, makeScratchDisk } from './disks.js';
import { LogStore } from './logs.js';
import type { MachineShape, Template, TemplateCache } from './templates.js';
import type { ImageService, ResolvedImage } from '../images/service.js';
import type { ImageConfig } from '../images/registry.js';
import { canTransition, isLive, requireState, type InstanceState } from './state.js';

/** Unix socket paths are limited to 107 bytes. */
const MAX_SOCKET_PATH = 107;
const RUN_TIMEOUT_MS = 30_000;
const DEFAULT_STOP_TIMEOUT_MS = 10_000;
/** After the guest was asked to power off, how long before the VMM is stopped by force. */
const POWEROFF_GRACE_MS = 10_000;

export interface CreateRequest {
  /** With an image: replaces its Cmd (its Entrypoint stays); may then be omitted. */
  command?: string[];
  /** An OCI image reference or digest; pulled first when this host does not have it. */
  image?: string;
  handle?: string;
  env?: Record<string, string>;
  /** Secret names for the workload's environment; `*` for all. */
  secrets?: string[];
  /** Delete the instance if it fails to start (`aegis run`). */
  autoRemove?: boolean;
  /** Ports to forward from the host into the guest. */
  exposes?: { guestPort: number; hostPort?: number; hostIp?: string; protocol?: 'tcp' }[];
  workdir?: string;
  memoryMiB?: number;
  vcpuCount?: number;
  network?: NetworkMode;
}

export interface ExecRequest {
  command: string[];
  env?: Record<string, string>;
  workdir?: string;
  /** Keep the command's stdin open for `execInput` (otherwise it reads /dev/null). */
  stdin?: boolean;
  /** Run on a pseudo-terminal of this size (stdin is then always open). */
  tty?: { rows: number; cols: number };
}

export type ExecEvent =
  | { type: 'started'; execId: string }
  | { type: 'output'; stream: Stream; data: string }
  | { type: 'exit'; exitCode: number | null; signal: string | null; guestDurationMs?: number };

export interface InstanceView {
  id: string;
  handle: string;
  state: InstanceState;
  command: string[];
  createdAt: string;
  startedAt?: string;
  stoppedAt?: string;
  exitCode: number | null;
  stateReason?: string;
  memoryMiB: number;
  vcpuCount: number;
  backend: string;
  ports: PortMapping[];
  network: NetworkMode;
  /** The image's reference (or digest when it has none); absent for the base rootfs. */
  image?: string;
  imageDigest?: string;
}

interface LiveInstance {
  id: string;
  handle: string;
  vm: Vm;
  agent: AgentConnection | undefined;
  logs: LogStore;
  execs: Map<string, { emit: (ev: ExecEvent) => void; fail: (err: AegisError) => void }>;
  exit: ExitEvent | undefined;
  forwarder: PortForwarder | undefined;
  /** Replaced by another VM for the same instance (a warm boot that fell back to cold). */
  retired?: boolean;
  /** Resolves after the VM's exit has been recorded. */
  finished: Promise<void>;
}

async function existingDisk(dir: string): Promise<{ path: string; format: 'raw' | 'qcow2' } | undefined> {
  for (const [name, format] of [
    ['scratch.qcow2', 'qcow2'],
    ['scratch.img', 'raw'],
  ] as const) {
    const file = path.join(dir, name);
    if (
      await fs.stat(file).then(
        () => true,
        () => false,
      )
    )
      return { path: file, format };
  }
  return undefined;
}

/** Docker's rule: a given command replaces the image's Cmd; its Entrypoint stays in front. */
function effectiveCommand(command: string[] | undefined, config: ImageConfig | undefined): string[] {
  const given = command && command.length > 0 ? command : undefined;
  const argv = config ? [...(config.entrypoint ?? []), ...(given ?? config.cmd ?? [])] : (given ?? []);
  if (argv.length === 0) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      config ? 'the image has no Entrypoint or Cmd: give a command after --' : 'a command is required',
    );
  }
  return argv;
}

function imageEnv(config: ImageConfig | undefined): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of config?.env ?? []) {
    const i = kv.indexOf('=');
    if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return env;
}

const iso = (ms: number | null): string | undefined => (ms === null ? undefined : new Date(ms).toISOString());

export function toView(row: InstanceRow): InstanceView {
  const view: InstanceView = {
    id: row.id,
    handle: row.handle,
    state: row.state,
    command: row.command,
    createdAt: new Date(row.createdAt).toISOString(),
    exitCode: row.exitCode,
    memoryMiB: row.memoryMiB,
    vcpuCount: row.vcpuCount,
    backend: row.backend,
    ports: row.ports,
    network: row.network,
  };
  if (row.image) {
    view.image = row.image.reference ?? row.image.digest;
    view.imageDigest = row.image.digest;
  }
  const startedAt = iso(row.startedAt);
  const stoppedAt = iso(row.stoppedAt);
  if (startedAt) view.startedAt = startedAt;
  if (stoppedAt) view.stoppedAt = stoppedAt;
  if (row.stateReason) view.stateReason = row.stateReason;
  return view;
}

export class InstanceManager {
  private readonly live = new Map<string, LiveInstance>();

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
  ) {}

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

  /** Moves an instance to a new state, refusing transitions the state table forbids. */
  private transition(id: string, to: InstanceState, patch: Parameters<Registry['updateInstance']>[1] = {}): boolean {
    const row = this.registry.getInstance(id);
    if (!row || !canTransition(row.state, to)) return false;
    this.registry.updateInstance(id, { ...patch, state: to });
    this.log.info(`instance ${row.handle} (${id}): ${row.state} -> ${to}${patch.stateReason ? ` (${patch.stateReason})` : ''}`);
    return true;
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
    // Host ports are bound first: a taken one fails the start before anything else exists.
    const forwarder = await PortForwarder.listen(
      (req.exposes ?? []).map((e) => ({
        guestPort: e.guestPort,
        hostPort: e.hostPort ?? 0,
        hostIp: e.hostIp ?? '127.0.0.1',
        protocol: 'tcp',
      })),
    );
    try {
      const image = req.image !== undefined ? await this.images.resolve(req.image, signal) : undefined;
      return await this.createWith(req, secretEnv, forwarder, image, signal);
    } catch (err) {
      forwarder.close();
      throw err;
    }
  }

  private async createWith(
    req: CreateRequest,
    secretEnv: Record<string, string>,
    forwarder: PortForwarder,
    image: ResolvedImage | undefined,
    signal: AbortSignal | undefined,
  ): Promise<InstanceView> {
    const command = effectiveCommand(req.command, image?.config);
    const id = randomBytes(8).toString('hex');
    const handle = req.handle ?? `i-${id.slice(0, 8)}`;
    const dir = this.dirOf(id);
    const vmDir = path.join(dir, 'vm');
    if (path.join(vmDir, 'agent.sock').length > MAX_SOCKET_PATH) {
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
      spec: { env: req.env ?? {}, secrets: req.secrets ?? [] },
    };
    this.registry.insertInstance(row); // ALREADY_EXISTS for a taken handle, before any work
    this.log.info(`instance ${handle} (${id}): creating`);
    const env = { ...imageEnv(image?.config), ...req.env, ...secretEnv };
    return this.launch(row, forwarder, image, env, { keepDisk: false, autoRemove: req.autoRemove === true }, signal);
  }

  /**
   * Boots the instance's VM (warm when a template fits and the disk is new), serves its ports,
   * and starts its workload; on failure the instance is `failed` with the reason (or removed).
   */
  private async launch(
    row: InstanceRow,
    forwarder: PortForwarder,
    image: ResolvedImage | undefined,
    env: Record<string, string>,
    options: { keepDisk: boolean; autoRemove: boolean },
    signal: AbortSignal | undefined,
  ): Promise<InstanceView> {
    const { id, handle } = row;
    const dir = this.dirOf(id);
    let vm: Vm | undefined;
    try {
      await fs.mkdir(path.join(dir, 'vm'), { recursive: true, mode: 0o700 });
      const shape = {
        kernelPath: await fs.realpath(this.config.kernelPath),
        rootfsPath: await fs.realpath(this.config.rootfsPath),
        memoryMiB: row.memoryMiB,
        vcpuCount: row.vcpuCount,
        scratchDiskMiB: this.config.scratchDiskMiB,
        network: row.network,
        ...(image ? { imageDiskPath: image.fsPath } : {}),
      };
      // A restart keeps the instance's disk (its writes), so it boots cold on that disk.
      const template = options.keepDisk ? undefined : this.templates.lookup(shape);
      let agent: AgentConnection;
      try {
        ({ vm, agent } = await this.boot(id, handle, dir, shape, template, options.keepDisk, signal));
      } catch (err) {
        if (!template || signal?.aborted) throw err;
        // A template that will not restore must not break instances: set it aside, boot cold.
        this.log.warn(`instance ${handle} (${id}): warm boot failed (${(err as Error).message}); booting cold`);
        await this.templates.discard(template);
        const failed = this.live.get(id);
        if (failed) {
          failed.retired = true;
          await failed.vm.stop({ timeoutMs: 1000 });
          await failed.finished;
        }
        this.registry.updateInstance(id, { vmRecord: null });
        ({ vm, agent } = await this.boot(id, handle, dir, shape, undefined, false, signal));
      }
      const live = this.live.get(id);
      if (live) this.serve(live, forwarder);
      const params = {
        command: row.command,
        env,
        ...(row.workdir ? { workdir: row.workdir } : {}),
        ...(image ? { image: image.config.user ? { user: image.config.user } : {} } : {}),
      };
      await agent.call('run', params, { timeoutMs: RUN_TIMEOUT_MS });
      // A workload that exits at once may already have moved us on to stopping.
      this.transition(id, 'running', { startedAt: Date.now() });
      return this.get(id);
    } catch (err) {
      const e = AegisError.from(err);
      // boot() may fail after its VM started (a guest that never answers): stop that one too.
      vm = this.live.get(id)?.vm ?? vm;
      const tail = e.code === 'TIMEOUT' && vm ? await vm.consoleTail(1500) : '';
      this.log.warn(`instance ${handle} (${id}): start failed: ${e.message}${tail ? `\n--- console ---\n${tail}` : ''}`);
      this.transition(id, 'failed', { stateReason: `start failed: ${e.message}`, stoppedAt: Date.now() });
      if (vm) {
        await vm.stop({ timeoutMs: 1000 }).catch(() => undefined);
        await this.live.get(id)?.finished;
      }
      forwarder.close();
      if (options.autoRemove) await this.delete(id, true).catch(() => undefined);
      throw e;
    }
  }

  /**
   * `docker restart`: stops the instance if it runs, then boots a new VM for it with the same
   * command, environment (secrets resolved again by name), image, network and host ports, on
   * its own disk, so what it wrote survives. Logs continue in the same store.
   */
  async restart(ref: string, signal?: AbortSignal): Promise<InstanceView> {
    let row = this.registry.resolveInstance(ref);
    if (isLive(row.state)) {
      await this.stop(row.id);
      row = this.registry.resolveInstance(row.id);
    }
    requireState(row.handle, row.state, ['stopped', 'failed'], 'restart');
    const secretEnv = this.secrets.resolve(row.spec.secrets);
    const image = row.image ? this.images.resolveDigest(row.image.digest) : undefined;
    if (row.network === 'user' && !this.networkModes.includes('user')) {
      throw new AegisError('UNSUPPORTED', `the ${this.backend.name} backend cannot give this instance its network here`);
    }
    const forwarder = await PortForwarder.listen(row.ports);
    if (!this.transition(row.id, 'starting', { exitCode: null, stateReason: null, startedAt: null, stoppedAt: null })) {
      forwarder.close();
      throw new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" changed state; try again`);
    }
    this.log.info(`instance ${row.handle} (${row.id}): restarting`);
    const env = { ...imageEnv(image?.config), ...row.spec.env, ...secretEnv };
    return this.launch(row, forwarder, image, env, { keepDisk: true, autoRemove: false }, signal);
  }

  /**
   * Starts the instance's VM, warm from `template` when given (restore + `fresh`), else cold,
   * and returns once its harness answers.
   */
  private async boot(
    id: string,
    handle: string,
    dir: string,
    shape: MachineShape,
    template: Template | undefined,
    keepDisk: boolean,
    signal: AbortSignal | undefined,
  ): Promise<{ vm: Vm; agent: AgentConnection }> {
    const t0 = Date.now();
    const phases: string[] = [];
    const phase = (name: string): void => void phases.push(`${name} ${Date.now() - t0}`);
    const vmDir = path.join(dir, 'vm');
    await fs.rm(vmDir, { recursive: true, force: true });
    await fs.mkdir(vmDir, { recursive: true, mode: 0o700 });
    // A kept disk is the instance's own: raw, or a child of the template it was cloned from.
    const kept = keepDisk ? await existingDisk(dir) : undefined;
    if (!kept) {
      await fs.rm(path.join(dir, 'scratch.img'), { force: true });
      await fs.rm(path.join(dir, 'scratch.qcow2'), { force: true });
    }
    const scratch = kept?.path ?? path.join(dir, template ? 'scratch.qcow2' : 'scratch.img');
    const scratchFormat = kept?.format ?? (template ? 'qcow2' : 'raw');
    if (!kept && template) await makeChildDisk(scratch, template.scratch);
    else if (!kept) await makeScratchDisk(scratch, shape.scratchDiskMiB);
    const vm = await this.backend.create(
      {
        id,
        stateDir: vmDir,
        kernelPath: shape.kernelPath,
        rootfsPath: shape.rootfsPath,
        scratchDiskPath: scratch,
        scratchDiskFormat: scratchFormat,
        memoryMiB: shape.memoryMiB,
        vcpuCount: shape.vcpuCount,
        network: shape.network,
        ...(shape.imageDiskPath ? { imageDiskPath: shape.imageDiskPath } : {}),
        // A restored machine must match its template's exactly; it gets its name from `fresh`.
        kernelArgs: template ? [] : [`aegis_hostname=${handle}`],
        ...(template ? { restoreFrom: template.snapshot, memoryFile: { path: template.memory, shared: false } } : {}),
      },
      signal,
    );
    phase('disk');
    await vm.start(signal);
    phase(template ? 'restored' : 'vmm started');
    this.registry.updateInstance(id, { vmRecord: vm.record() });
    const live = this.track(id, handle, vm);
    await this.connectAgent(live, this.config.bootTimeoutMs, signal);
    phase('agent ready');
    const agent = live.agent;
    if (!agent) throw new AegisError('UNAVAILABLE', 'agent channel closed during boot');
    if (template) {
      const fresh = { timeMs: Date.now(), hostname: handle, entropy: randomBytes(64).toString('base64') };
      await agent.call('fresh', fresh, { timeoutMs: 15_000 });
      phase('fresh');
    }
    this.log.info(`instance ${handle} (${id}): ${template ? 'warm' : 'cold'} boot, ms: ${phases.join(', ')}`);
    return { vm, agent };
  }

  /** Builds the warm-boot template for the default machine shape, in the background. */
  async warmUp(): Promise<void> {
    try {
      await this.templates.ensure({
        kernelPath: await fs.realpath(this.config.kernelPath),
        rootfsPath: await fs.realpath(this.config.rootfsPath),
        memoryMiB: this.config.defaultMemoryMiB,
        vcpuCount: this.config.defaultVcpuCount,
        scratchDiskMiB: this.config.scratchDiskMiB,
        network: this.defaultNetwork(),
      });
    } catch {
      // no artifacts yet: instances will say so
    }
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
    forwarder.serve(() => live.vm.connectData());
  }

  /** Starts following a VM: its exit, and (once connected) its agent. */
  private track(id: string, handle: string, vm: Vm): LiveInstance {
    let markFinished!: () => void;
    const live: LiveInstance = {
      id,
      handle,
      vm,
      agent: undefined,
      logs: new LogStore(path.join(this.dirOf(id), 'output.ndjson')),
      execs: new Map(),
      exit: undefined,
      forwarder: undefined,
      finished: new Promise((r) => (markFinished = r)),
    };
    this.live.set(id, live);
    void vm.exited.then((exit) => {
      this.onVmExit(live, exit);
      markFinished();
    });
    return live;
  }

  private async connectAgent(live: LiveInstance, timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const stream = await live.vm.connectAgent(signal);
    const agent = new AgentConnection(
      stream,
      (event, params) => this.onAgentEvent(live, event, params),
      (err) => this.log.warn(`instance ${live.handle}: bad message from guest: ${err.message}`),
    );
    live.agent = agent;
    void agent.closed.then(() => {
      if (live.agent === agent) live.agent = undefined;
    });
    await agent.waitReady(timeoutMs, signal);
  }

  private onAgentEvent<E extends keyof GuestEvents>(live: LiveInstance, event: E, params: GuestEvents[E]): void {
    switch (event) {
      case 'output': {
        const ev = params as GuestEvents['output'];
        live.logs.append(ev.stream, Buffer.from(ev.data, 'base64'), ev.execId);
        if (ev.execId !== undefined) live.execs.get(ev.execId)?.emit({ type: 'output', stream: ev.stream, data: ev.data });
        return;
      }
      case 'execExit': {
        const ev = params as GuestEvents['execExit'];
        const sink = live.execs.get(ev.execId);
        live.execs.delete(ev.execId);
        sink?.emit({
          type: 'exit',
          exitCode: ev.exitCode,
          signal: ev.signal,
          ...(ev.durationMs !== undefined ? { guestDurationMs: ev.durationMs } : {}),
        });
        return;
      }
      case 'exit': {
        const ev = params as GuestEvents['exit'];
        live.exit = ev;
        const code = exitStatus(ev);
        this.registry.updateInstance(live.id, { exitCode: code });
        this.transition(live.id, 'stopping', { stateReason: `workload exited with status ${code}` });
        void this.powerOff(live, 1000);
        return;
      }
      case 'ready':
        return;
    }
  }

  /** Asks the harness to end the VM; forces the VMM down if the guest does not comply. */
  private async powerOff(live: LiveInstance, workloadTimeoutMs: number): Promise<void> {
    try {
      await live.agent?.call('shutdown', { timeoutMs: workloadTimeoutMs }, { timeoutMs: workloadTimeoutMs + 5000 });
    } catch (err) {
      this.log.warn(`instance ${live.handle}: shutdown request failed: ${(err as Error).message}`);
    }
    const exited = await Promise.race([
      live.vm.exited.then(() => true),
      new Promise<boolean>((r) => setTimeout(() => r(false), POWEROFF_GRACE_MS).unref()),
    ]);
    if (!exited) await live.vm.stop({ timeoutMs: 2000 });
    await live.finished;
  }

  private onVmExit(live: LiveInstance, exit: VmExit): void {
    live.agent?.close();
    if (!live.retired) live.forwarder?.close();
    if (live.retired) {
      if (this.live.get(live.id) === live) this.live.delete(live.id);
      return;
    }
    const row = this.registry.getInstance(live.id);
    if (row && isLive(row.state)) {
      const clean = live.exit !== undefined || row.state === 'stopping' || exit.reason === 'host-stop';
      const to: InstanceState = clean ? 'stopped' : 'failed';
      const reason = clean ? (row.stateReason ?? exit.detail) : `VM ended unexpectedly: ${exit.detail}`;
      this.transition(live.id, to, { stoppedAt: Date.now(), stateReason: reason, vmRecord: null });
    }
    const after = this.registry.getInstance(live.id);
    for (const sink of live.execs.values()) sink.fail(new AegisError('UNAVAILABLE', `instance ${live.handle} stopped during exec`));
    live.execs.clear();
    live.logs.end({
      state: after?.state ?? 'stopped',
      exitCode: after?.exitCode ?? null,
      ...(after?.stateReason ? { stateReason: after.stateReason } : {}),
    });
    if (this.live.get(live.id) === live) this.live.delete(live.id);
  }

  private requireLive(row: InstanceRow, op: string): LiveInstance {
    const live = this.live.get(row.id);
    if (!live) throw new AegisError('FAILED_PRECONDITION', `cannot ${op} instance "${row.handle}": its VM is not running`);
    return live;
  }

  async stop(ref: string, timeoutMs = DEFAULT_STOP_TIMEOUT_MS): Promise<InstanceView> {
    const row = this.registry.resolveInstance(ref);
    if (row.state === 'stopped' || row.state === 'failed') return toView(row); // like docker stop: nothing to do
    const live = this.live.get(row.id);
    if (!live) {
      this.transition(row.id, 'failed', { stateReason: 'VM was not found', stoppedAt: Date.now() });
      return this.get(row.id);
    }
    if (row.state === 'paused') await live.vm.resume();
    this.transition(row.id, 'stopping', { stateReason: 'stopped by request' });
    await this.powerOff(live, timeoutMs);
    return this.get(row.id);
  }

  async delete(ref: string, force: boolean): Promise<void> {
    const row = this.registry.resolveInstance(ref);
    if (isLive(row.state)) {
      if (!force) {
        throw new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" is ${row.state}; stop it first or delete with --force`);
      }
      await this.stop(row.id, 2000);
    }
    await fs.rm(this.dirOf(row.id), { recursive: true, force: true });
    this.registry.deleteInstance(row.id);
    this.log.info(`instance ${row.handle} (${row.id}): deleted`);
  }

  async pause(ref: string): Promise<InstanceView> {
    const row = this.registry.resolveInstance(ref);
    requireState(row.handle, row.state, ['running'], 'pause');
    await this.requireLive(row, 'pause').vm.pause();
    this.transition(row.id, 'paused');
    return this.get(row.id);
  }

  async resume(ref: string): Promise<InstanceView> {
    const row = this.registry.resolveInstance(ref);
    requireState(row.handle, row.state, ['paused'], 'resume');
    await this.requireLive(row, 'resume').vm.resume();
    this.transition(row.id, 'running');
    return this.get(row.id);
  }

  /** Runs a command in the instance, calling `emit` for each event; resolves after `exit`. */
  async exec(ref: string, req: ExecRequest, emit: (ev: ExecEvent) => void, signal?: AbortSignal): Promise<void> {
    const row = this.registry.resolveInstance(ref);
    const agent = this.runningAgent(row.id, 'exec in');
    const live = this.requireLive(row, 'exec in');
    const execId = randomBytes(6).toString('hex');
    const done = new Promise<void>((resolve, reject) => {
      live.execs.set(execId, {
        emit: (ev) => {
          emit(ev);
          if (ev.type === 'exit') resolve();
        },
        fail: reject,
      });
    });
    try {
      // In an image, exec runs as `docker exec` does: the image's env, user and working directory.
      const image = row.image ? this.images.resolveDigest(row.image.digest).config : undefined;
      const workdir = req.workdir ?? image?.workingDir;
      const params = {
        execId,
        command: req.command,
        env: { ...imageEnv(image), ...req.env },
        ...(workdir ? { workdir } : {}),
        ...(image ? { image: image.user ? { user: image.user } : {} } : {}),
        ...(req.stdin ? { stdin: true } : {}),
        ...(req.tty ? { tty: req.tty } : {}),
      };
      await agent.call('exec', params, { timeoutMs: RUN_TIMEOUT_MS });
    } catch (err) {
      live.execs.delete(execId);
      throw err;
    }
    emit({ type: 'started', execId });
    const onAbort = (): void => {
      // The caller went away: don't leave its command running unseen.
      void agent.call('signal', { execId, signal: 'SIGKILL' }, { timeoutMs: 5000 }).catch(() => undefined);
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await done;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
  }

  private runningAgent(ref: string, op: string): AgentConnection {
    const row = this.registry.resolveInstance(ref);
    requireState(row.handle, row.state, ['running'], op);
    const agent = this.requireLive(row, op).agent;
    if (!agent) throw new AegisError('UNAVAILABLE', `agent of instance "${row.handle}" is not connected`);
    return agent;
  }

  /** Sends a signal to the workload, or to one exec. */
  async signal(ref: string, signal: string, execId?: string): Promise<void> {
    const agent = this.runningAgent(ref, 'signal');
    await agent.call('signal', execId === undefined ? { signal } : { execId, signal }, { timeoutMs: 10_000 });
  }

  /** Resizes an exec's terminal. */
  async resizeExec(ref: string, execId: string, rows: number, cols: number): Promise<void> {
    await this.runningAgent(ref, 'resize a terminal in').call('resize', { execId, rows, cols }, { timeoutMs: 10_000 });
  }

  /** Feeds an exec's stdin (base64 `data`, then optionally end of file). */
  async execInput(ref: string, execId: string, data: string | undefined, eof: boolean): Promise<void> {
    const agent = this.runningAgent(ref, 'write to');
    const params = { execId, ...(data !== undefined ? { data } : {}), ...(eof ? { eof: true } : {}) };
    await agent.call('stdin', params, { timeoutMs: 30_000 });
  }

  /** The log store of an instance plus whether more output can still come. */
  logs(ref: string): { row: InstanceRow; store: LogStore; live: boolean } {
    const row = this.registry.resolveInstance(ref);
    const live = this.live.get(row.id);
    return { row, store: this.logsOf(row.id), live: live !== undefined && isLive(row.state) };
  }

  /** Finds VMs left running by an earlier daemon and takes them over. */
  async recover(): Promise<void> {
    for (const row of this.registry.listInstances()) {
      if (!isLive(row.state)) continue;
      if (!row.vmRecord || row.state === 'starting') {
        if (row.vmRecord) {
          const vm = await this.backend.attach(row.vmRecord).catch(() => undefined);
          await vm?.stop({ timeoutMs: 1000 });
        }
        this.transition(row.id, 'failed', { stateReason: 'aegisd stopped while the instance was starting', stoppedAt: Date.now() });
        continue;
      }
      let vm: Vm;
      try {
        vm = await this.backend.attach(row.vmRecord);
      } catch (err) {
        const clean = row.state === 'stopping' || row.exitCode !== null;
        this.transition(row.id, clean ? 'stopped' : 'failed', {
          stateReason: `VM ended while aegisd was not running (${(err as Error).message})`,
          stoppedAt: Date.now(),
          vmRecord: null,
        });
        continue;
      }
      const live = this.track(row.id, row.handle, vm);
      if (row.ports.length > 0) {
        // The same host ports as before; connections that were open did not survive.
        await PortForwarder.listen(row.ports).then(
          (f) => this.serve(live, f),
          (err: unknown) => this.log.warn(`instance ${row.handle}: ports not restored: ${(err as Error).message}`),
        );
      }
      try {
        await this.connectAgent(live, 15_000);
        this.log.info(`instance ${row.handle} (${row.id}): reattached (${row.state})`);
        if (row.state === 'stopping') void this.powerOff(live, 1000);
      } catch (err) {
        this.log.warn(`instance ${row.handle}: agent did not answer after reattach: ${(err as Error).message}`);
        if (row.state !== 'paused') void this.powerOff(live, 1000);
      }
    }
  }

  /** Lets go of every VM without stopping it: the next daemon takes them over. */
  detachAll(): void {
    for (const live of this.live.values()) {
      live.agent?.close();
      live.vm.detach();
    }
  }
}
