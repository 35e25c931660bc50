/**
 * The machinery of one instance's owner (instance.ts is the owner, with the operations callers
 * ask for): its operation queue, its running VM and what that VM reports, its deadline and
 * idle clock, and `settle`, the one place a throwaway instance is removed. Every state change
 * is a compare-and-set against the state table (state.ts), made from inside the queue.
 */
import type { Snapshot, SnapshotStore } from '../snapshots/store.js';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError, exitStatus, formatDurationMs, type ExitEvent, type FileRequest } from '@aegis/protocol';
import type { NetworkMode } from '@aegis/protocol/api';
import type { Backend, VmExit } from '@aegis/vmm';
import type { DaemonConfig } from '../config.js';
import type { Logger } from '../log.js';
import type { InstanceRow, Registry } from '../registry/db.js';
import type { SecretStore } from '../secrets/store.js';
import type { ImageService, ResolvedImage } from '../images/service.js';
import type { PortForwarder } from '../ports/forwarder.js';
import type { HostMounts } from '../volumes/host-mounts.js';
import type { VolumeService } from '../volumes/service.js';
import type { AgentConnection } from './agent.js';
import type { EventBus, NewEvent } from '../events/bus.js';
import type { DaemonMetrics } from '../metrics.js';
import { DeadlineTimer } from './deadlines.js';
import { removeHibernation } from './hibernation.js';
import { IdleClock, idleReason, isIdlePaused } from './idle.js';
import type { LiveEvents, LiveInstance } from './live.js';
import { OpQueue } from './op-queue.js';
import type { PooledVm } from './pool.js';
import { toView, type InstanceView } from './spec.js';
import { canTransition, isLive, isUp, requireState, type InstanceState } from './state.js';
import type { MachineShape, TemplateCache } from './templates.js';

/** What every instance's owner shares with the others. */
export interface InstanceServices {
  config: DaemonConfig;
  registry: Registry;
  backend: Backend;
  log: Logger;
  secrets: SecretStore;
  templates: TemplateCache;
  images: ImageService;
  volumes: VolumeService;
  mounts: HostMounts;
  /** The network modes an instance can have here (instances/network.ts). */
  networkModes: readonly NetworkMode[];
  snapshots: SnapshotStore;
  /** Where lifecycle events go (`aegis events`). */
  events: EventBus;
  /** Latency histograms of `/metrics` (boots, wakes, execs). */
  metrics: DaemonMetrics;
}

/** What a create hands the instance's first start. */
export interface StartPlan {
  /** Its host ports, bound already. */
  forwarder: PortForwarder;
  image: ResolvedImage | undefined;
  env: Record<string, string>;
  /** A ready VM from the warm pool (its files are in the instance's directory). */
  pooled?: PooledVm | undefined;
  /** Worked out already by the create (to look in the pool). */
  shape?: MachineShape | undefined;
  /** Resume this checkpoint (verified by the create): the workload carries on, nothing is run. */
  checkpoint?: Snapshot | undefined;
}

/** A file request as a caller gives it: which root (image or not) is the instance's to say. */
export type FileOpRequest = FileRequest extends infer R ? (R extends FileRequest ? Omit<R, 'image'> : never) : never;

type Patch = Parameters<Registry['updateInstance']>[1];

export const DEFAULT_STOP_TIMEOUT_MS = 10_000;
/** At a deadline the workload gets this long after SIGTERM: the deadline is the user's limit, not a start of grace. */
const DEADLINE_STOP_TIMEOUT_MS = 1000;

export abstract class InstanceOwner implements LiveEvents {
  readonly dir: string;
  /** Resolves once the instance is removed (row and files gone). */
  readonly removed: Promise<void>;
  protected markRemoved!: () => void;
  protected readonly queue = new OpQueue();
  protected live: LiveInstance | undefined;
  protected readonly deadline = new DeadlineTimer(() => void this.deadlineReached());
  /** `--idle-pause`: when it has gone unused for its idle time (idle.ts). */
  protected readonly idle = new IdleClock(() => void this.idlePause());

  constructor(
    readonly id: string,
    protected readonly s: InstanceServices,
  ) {
    this.dir = path.join(s.config.instancesDir, id);
    this.removed = new Promise((r) => (this.markRemoved = r));
  }

  row(): InstanceRow {
    const row = this.s.registry.getInstance(this.id);
    if (!row) throw new AegisError('NOT_FOUND', `instance ${this.id} not found`);
    return row;
  }

  view(): InstanceView {
    return toView(this.row());
  }

  /** Its timers as its row says (a new instance, or one found by a new daemon). */
  armFromRow(): void {
    const row = this.row();
    if (isUp(row.state) && row.spec.deadlineAtMs !== undefined) this.deadline.arm(row.spec.deadlineAtMs);
    // Idle time starts again with a new daemon; an idle-paused one stays paused until used.
    const firstIdleMs = row.spec.idlePauseMs || row.spec.idleHibernateMs;
    if (row.state === 'running' && firstIdleMs) this.idle.arm(firstIdleMs);
    // An idle-paused one that is to hibernate later: the rest of that time from now.
    if (isIdlePaused(row)) this.armIdleHibernate(row);
  }

  /**
   * Runs `fn` as the instance's next operation, on its row as it is then. `signal` is the
   * caller's: an operation whose caller went away before its turn does not run, unless it
   * must undo what was prepared for it (`always`: a create's start).
   */
  protected op<T>(
    name: string,
    fn: (row: InstanceRow, signal: AbortSignal) => Promise<T>,
    o: { cancels?: readonly string[]; signal?: AbortSignal | undefined; always?: boolean } = {},
  ): Promise<T> {
    if (o.cancels) this.queue.cancel(o.cancels, `cancelled by ${name}`);
    return this.queue.run(name, async (own) => {
      try {
        if (!o.always) o.signal?.throwIfAborted();
        return await fn(this.row(), o.signal ? AbortSignal.any([own, o.signal]) : own);
      } finally {
        await this.settle();
      }
    });
  }

  /** The one place a throwaway instance is removed: once it is down and no VM of its is left. */
  protected async settle(): Promise<void> {
    const row = this.s.registry.getInstance(this.id);
    if (!row?.spec.autoRemove || isUp(row.state) || this.live) return;
    await this.removeNow().catch((err: unknown) => this.s.log.warn(`instance ${row.handle}: removal failed: ${(err as Error).message}`));
  }

  /** Compare-and-set from the state it is in now to `to`, if the table allows; false when refused. */
  protected move(to: InstanceState, patch: Patch = {}, from?: readonly InstanceState[]): boolean {
    const row = this.s.registry.getInstance(this.id);
    if (!row || (from && !from.includes(row.state)) || !canTransition(row.state, to)) return false;
    if (!this.s.registry.transitionInstance(this.id, row.state, { ...patch, state: to })) return false;
    this.s.log.info(`instance ${row.handle} (${this.id}): ${row.state} -> ${to}${patch.stateReason ? ` (${patch.stateReason})` : ''}`);
    const type = eventOf(row.state, to);
    if (type) {
      const reason = patch.stateReason ?? undefined;
      const exitCode = patch.exitCode !== undefined ? patch.exitCode : row.exitCode;
      this.publish(row, {
        type,
        state: to,
        previousState: row.state,
        ...(reason ? { reason } : {}),
        ...(to === 'stopped' || to === 'failed' ? { exitCode } : {}),
      });
    }
    // Idle time counts only while it runs: from each start or wake, not across a pause.
    const firstIdleMs = row.spec.idlePauseMs || row.spec.idleHibernateMs;
    if (to === 'running' && firstIdleMs) this.idle.arm(firstIdleMs);
    else if (to !== 'running') this.idle.disarm();
    clearTimeout(this.hibernateTimer);
    this.hibernateTimer = undefined;
    return true;
  }

  /** Publishes a lifecycle event of this instance (`aegis events`), with its handle and labels. */
  protected publish(row: InstanceRow, e: Omit<NewEvent, 'instanceId' | 'handle' | 'labels'>): void {
    this.s.events.publish({ ...e, instanceId: this.id, handle: row.handle, ...(row.spec.labels ? { labels: row.spec.labels } : {}) });
  }

  protected mustMove(to: InstanceState, patch: Patch = {}): void {
    if (this.move(to, patch)) return;
    const row = this.s.registry.getInstance(this.id);
    throw new AegisError('FAILED_PRECONDITION', `instance "${row?.handle ?? this.id}" is ${row?.state ?? 'gone'}, it cannot become ${to}`);
  }

  protected requireLive(row: InstanceRow, op: string): LiveInstance {
    if (!this.live) throw new AegisError('FAILED_PRECONDITION', `cannot ${op} instance "${row.handle}": its VM is not running`);
    return this.live;
  }

  /** Within an operation: ends the VM, the workload first given `timeoutMs`. */
  protected async stopNow(row: InstanceRow, timeoutMs: number, reason = 'stopped by request'): Promise<void> {
    if (row.state === 'hibernated') {
      // No VM to signal: its saved machine is dropped, as a SIGKILL would have ended it.
      await this.discardHibernation();
      this.mustMove('stopped', { stateReason: reason, stoppedAt: Date.now(), ...(row.exitCode === null ? { exitCode: 137 } : {}) });
      return;
    }
    if (!isLive(row.state)) return; // like docker stop: nothing to do
    const live = this.live;
    if (!live) {
      this.move('failed', { stateReason: 'VM was not found', stoppedAt: Date.now(), vmRecord: null });
      return;
    }
    // A frozen VMM never answers `cont`: don't let that hold the stop past its deadline.
    if (row.state === 'paused') {
      await Promise.race([live.vm.resume().catch(() => undefined), new Promise((r) => setTimeout(r, 1000))]);
      live.resumed();
    }
    this.move('stopping', { stateReason: reason }, ['running', 'paused', 'starting']);
    const status = await live.powerOff(timeoutMs);
    // The workload ended by this stop: its status as Docker keeps it (`wait` prints 143 or 137),
    // unless its own exit event got here first.
    if (status !== undefined && this.s.registry.getInstance(this.id)?.exitCode === null) {
      this.s.registry.updateInstance(this.id, { exitCode: status });
    }
    this.vmEnded(live);
  }

  /** Ends the VM at once and records its end. */
  protected async kill(live: LiveInstance): Promise<void> {
    await live.kill();
    this.vmEnded(live);
  }

  /** Within an operation: removes a stopped instance's files and row; later operations find nothing. */
  protected async removeNow(): Promise<void> {
    const row = this.s.registry.getInstance(this.id);
    if (!row) return;
    if (this.live) await this.kill(this.live); // never leave a VM without its row
    this.sleepingPorts?.close();
    this.sleepingPorts = undefined;
    await fs.rm(this.dir, { recursive: true, force: true });
    this.s.registry.deleteInstance(this.id);
    this.publish(row, { type: 'delete' });
    this.s.events.forget(this.id);
    this.deadline.clear();
    this.idle.disarm();
    this.queue.close(new AegisError('NOT_FOUND', `instance "${row.handle}" was deleted`));
    this.s.log.info(`instance ${row.handle} (${this.id}): deleted`);
    void this.s.templates.collect().catch(() => undefined);
    this.markRemoved();
  }

  onWorkloadExit(live: LiveInstance, ev: ExitEvent): void {
    const code = exitStatus(ev);
    // A fact the guest reported, kept at once whatever is queued; what it means for the state is queued.
    this.s.registry.updateInstance(this.id, { exitCode: code });
    const row = this.s.registry.getInstance(this.id);
    if (row) this.publish(row, { type: 'exit', exitCode: code, state: row.state });
    void this.op('workload-exit', async () => {
      if (this.live !== live) return;
      const reason = `workload exited with status ${code}`;
      // From starting, running or paused; a stop already on its way keeps its reason.
      this.move('stopping', { stateReason: reason }, ['starting', 'running', 'paused']);
      // Its status is known now: `run` returns while the VM powers off behind it.
      live.logs.workloadExited({ state: 'stopping', exitCode: code, stateReason: reason });
      await live.powerOff(1000);
      this.vmEnded(live);
    }).catch(() => undefined);
  }

  onVmExit(live: LiveInstance): void {
    // Usually recorded already by the operation that ended it; otherwise (a crash, a guest
    // that powered off by itself) this is where.
    void this.op('vm-exit', () => Promise.resolve(this.vmEnded(live))).catch(() => undefined);
  }

  /** The VM under the instance has gone: what that means for the instance, decided once per VM. */
  protected vmEnded(live: LiveInstance): void {
    if (live.recorded) return;
    live.recorded = true;
    if (this.live === live) this.live = undefined;
    if (live.retired) return;
    const exit: VmExit = live.vmExit ?? { reason: 'killed', detail: 'VM ended' };
    const row = this.s.registry.getInstance(this.id);
    if (row && isLive(row.state)) {
      const clean = live.exit !== undefined || row.state === 'stopping' || exit.reason === 'host-stop';
      // A VM that ended under a paused instance (nobody stopped it through `stop`, which
      // resumes first) did not stop cleanly from the user's point of view: failed, with why.
      const to: InstanceState = clean && canTransition(row.state, 'stopped') ? 'stopped' : 'failed';
      const reason = clean ? (row.stateReason ?? exit.detail) : `VM ended unexpectedly: ${exit.detail}`;
      if (!this.move(to, { stoppedAt: Date.now(), stateReason: reason, vmRecord: null })) {
        this.s.log.warn(`instance ${live.handle}: VM exit not recorded: ${row.state} -> ${to} refused`);
      }
    }
    const after = this.s.registry.getInstance(this.id);
    live.logs.end({
      state: after?.state ?? 'stopped',
      exitCode: after?.exitCode ?? null,
      ...(after?.stateReason ? { stateReason: after.stateReason } : {}),
    });
  }

  /**
   * Admission of a call to the guest, as an operation (no stop slips in between the check and
   * the call); an idle-paused instance is woken first. The call itself runs outside the queue.
   */
  protected admit(op: string, why: string): Promise<{ row: InstanceRow; agent: AgentConnection; live: LiveInstance }> {
    this.idle.touch();
    return this.op(op, async (queued) => {
      const row = await this.wakeNow(queued, why);
      requireState(row.handle, row.state, ['running'], op);
      const live = this.requireLive(row, op);
      if (!live.agent) throw new AegisError('UNAVAILABLE', `agent of instance "${row.handle}" is not connected`);
      return { row, agent: live.agent, live };
    });
  }

  protected setDeadline(timeoutMs: number): void {
    const spec = { ...this.row().spec };
    if (timeoutMs > 0) spec.deadlineAtMs = Date.now() + timeoutMs;
    else delete spec.deadlineAtMs;
    this.s.registry.setInstanceSpec(this.id, spec);
    if (spec.deadlineAtMs !== undefined) this.deadline.arm(spec.deadlineAtMs);
    else this.deadline.clear();
  }

  /** The workload gets SIGTERM and a short grace, the VM stops; `settle` removes a throwaway one. */
  protected async deadlineReached(): Promise<void> {
    const row = this.s.registry.getInstance(this.id);
    if (!row || !isUp(row.state) || row.spec.deadlineAtMs === undefined || row.spec.deadlineAtMs > Date.now()) {
      return;
    }
    this.s.log.info(`instance ${row.handle} (${this.id}): deadline reached; stopping it`);
    const reason = `deadline reached (--timeout ${row.spec.timeoutMs ?? 0} ms)`;
    this.publish(row, { type: 'deadline', state: row.state, reason });
    // An exec in flight ends saying why, not as a channel that closed under it.
    this.live?.failExecs(
      new AegisError(
        'TIMEOUT',
        `instance "${row.handle}" reached its deadline (--timeout ${row.spec.timeoutMs ?? 0} ms) and is being stopped`,
      ),
    );
    await this.stop(DEADLINE_STOP_TIMEOUT_MS, reason).catch((err: unknown) =>
      this.s.log.warn(`instance ${row.handle}: stop at its deadline failed: ${(err as Error).message}`),
    );
  }

  /**
   * `--idle-pause`: unused for its idle time. Paused as the user's `pause` does, through the
   * queue, after looking again (a use may have come while this waited).
   */
  protected async idlePause(): Promise<void> {
    const spec = this.s.registry.getInstance(this.id)?.spec;
    // Hibernation alone (no idle pause): the first idle time hibernates it.
    if (spec?.idleHibernateMs && !spec.idlePauseMs) return this.idleHibernate();
    try {
      await this.op('idle-pause', async (row) => {
        const live = this.live;
        if (row.state !== 'running' || !live || !row.spec.idlePauseMs) return;
        if (!this.idle.isIdle()) return this.idle.reschedule();
        await live.vm.pause();
        live.paused = true;
        if (!this.move('paused', { stateReason: idleReason(row.spec.idlePauseMs) }, ['running'])) {
          // The workload exited (or the VM went) meanwhile: that is its state; let it run to its end.
          await live.vm.resume().catch(() => undefined);
          live.resumed();
          return;
        }
        this.armIdleHibernate(this.row());
      });
    } catch (err) {
      const e = AegisError.from(err);
      if (e.code !== 'NOT_FOUND') this.s.log.warn(`instance ${this.id}: idle pause failed: ${e.message}`);
    }
  }

  /** Fires once an idle-paused instance has been unused for its idleHibernateMs (cleared by any state change). */
  private hibernateTimer: NodeJS.Timeout | undefined;

  private armIdleHibernate(row: InstanceRow): void {
    if (!row.spec.idleHibernateMs || !row.spec.idlePauseMs) return;
    clearTimeout(this.hibernateTimer);
    this.hibernateTimer = setTimeout(() => void this.idleHibernate(), row.spec.idleHibernateMs - row.spec.idlePauseMs);
    this.hibernateTimer.unref();
  }

  /** `--idle-hibernate`: still unused (running and idle, or idle-paused): hibernated, woken by use. */
  private async idleHibernate(): Promise<void> {
    const row = this.s.registry.getInstance(this.id);
    if (!row?.spec.idleHibernateMs) return;
    const idle = isIdlePaused(row) || (row.state === 'running' && this.idle.isIdle());
    if (!idle) {
      if (row.state === 'running') this.idle.reschedule();
      return;
    }
    try {
      await this.hibernate(undefined, { reason: `unused for ${formatDurationMs(row.spec.idleHibernateMs)}` });
    } catch (err) {
      const e = AegisError.from(err);
      if (e.code !== 'NOT_FOUND') this.s.log.warn(`instance ${this.id}: idle hibernation failed: ${e.message}`);
    }
  }

  /** Hibernates it (instance.ts); `idle`: only if it is still unused, with that state reason. */
  abstract hibernate(signal?: AbortSignal, idle?: { reason: string }): Promise<InstanceView>;

  /** Within an operation: resumes an idle-paused instance (`why` woke it); any other row is returned as it is. */
  protected async wakeNow(row: InstanceRow, why: string, signal?: AbortSignal): Promise<InstanceRow> {
    if (row.state === 'hibernated') return this.restoreHibernated(row, why, signal);
    if (!isIdlePaused(row)) return row;
    const live = this.requireLive(row, 'wake');
    const started = Date.now();
    await live.vm.resume();
    this.mustMove('running', { stateReason: null });
    live.resumed();
    this.s.metrics.woke('idle-pause', (Date.now() - started) / 1000);
    this.s.log.info(`instance ${row.handle} (${this.id}): woken by ${why} in ${Date.now() - started} ms`);
    return this.row();
  }

  /**
   * Resumes it if it is idle-paused (several wakers at once queue behind one resume and find
   * it running); a user's pause is left alone. Use either way: its idle time restarts.
   */
  async wake(why: string): Promise<InstanceRow> {
    this.idle.touch();
    const row = this.row();
    if (!isIdlePaused(row) && row.state !== 'hibernated') return row;
    return this.op('wake', (current, signal) => this.wakeNow(current, why, signal));
  }

  /** Within an operation: the hibernated machine restored and running again where it was (instance.ts). */
  protected abstract restoreHibernated(row: InstanceRow, why: string, signal?: AbortSignal): Promise<InstanceRow>;

  /** The host ports of a hibernated instance: still bound, a connection wakes it. */
  protected sleepingPorts: PortForwarder | undefined;

  protected async discardHibernation(): Promise<void> {
    this.sleepingPorts?.close();
    this.sleepingPorts = undefined;
    await removeHibernation(this.dir);
  }

  /** Keeps it from pausing for idleness until the returned function is called (an attached `run`). */
  holdAwake(): () => void {
    return this.idle.hold();
  }

  /** Lets go of its VM without stopping it: the next daemon takes it over. */
  detach(): void {
    this.deadline.clear();
    this.idle.disarm();
    this.live?.detach();
    this.live = undefined;
  }

  /** Stops the instance (instance.ts): what a deadline, and a reattached VM that must end, ask for. */
  abstract stop(timeoutMs?: number, reason?: string): Promise<InstanceView>;
}

/** The lifecycle event a state change is, if any (starting and stopping are steps, not events). */
function eventOf(from: InstanceState, to: InstanceState): NewEvent['type'] | undefined {
  switch (to) {
    case 'running':
      return from === 'paused' ? 'resume' : from === 'hibernated' ? 'restore' : 'start';
    case 'paused':
      return 'pause';
    case 'hibernated':
      return 'hibernate';
    case 'stopped':
      return 'stop';
    case 'failed':
      return 'fail';
    default:
      return undefined;
  }
}
