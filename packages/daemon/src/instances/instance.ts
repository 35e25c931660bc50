/**
 * One instance's owner (containerd's per-task `Init`, a VMM's single API thread): its
 * operation queue, its running VM, its deadline and idle clock (owner.ts holds that machinery;
 * this file, what callers ask of an instance). Every operation that changes it — start, stop, delete, pause, resume, restart, the admission of an exec, a signal, a
 * resize, input, a files call, `top` — runs as the next item of its queue, so none interleave;
 * a start in flight is cancelled by the stop or delete queued behind it. What the VM does (the
 * workload exited, the VMM went away) arrives as queued events too. Reads (`view`, `logs`,
 * `stats`, `wait`) and the deadline (`extend`, which must not wait behind a boot) go through
 * this object without queueing.
 *
 * State changes are compare-and-set against the state table (state.ts). After every queued
 * step `settle` looks once: a throwaway instance (`autoRemove`) that is down is removed — the
 * only place that decision is made.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Duplex, Readable } from 'node:stream';
import { AegisError, type FileRequest, type PsResult } from '@aegis/protocol';
import type { EgressPolicy, EgressView } from '@aegis/protocol/api';
import type { Vm } from '@aegis/vmm';
import type { InstanceRow } from '../registry/db.js';
import { PortForwarder } from '../ports/forwarder.js';
import type { AgentConnection } from './agent.js';
import { freshIdentity, machineShape, startVm, type VmPlan } from './boot.js';
import { fileOp, type FileResult } from './files.js';
import { isIdlePaused } from './idle.js';
import { LiveInstance, type ExecEmitter } from './live.js';
import { LogStore } from './logs.js';
import type { PooledVm } from './pool.js';
import { GuestEgress, TRUST_ENV } from './guest-egress.js';
import { existingDisk, identityOf, imageEnv, type ExecRequest, type InstanceView } from './spec.js';
import { readMachine, restoreMismatch } from './machine.js';
import { readHibernation, removeHibernation, saveHibernation } from './hibernation.js';
import type { Snapshot } from '../snapshots/store.js';
import { checkpointRefusal, saveCheckpoint } from '../snapshots/checkpoint.js';
import { isLive, isUp, requireState, type InstanceState } from './state.js';
import { allocatedBytes, measure, processMemoryBytes, sampleCpu, type InstanceStats, type ProcessSample } from './stats.js';
import type { InstanceFigures } from '../metrics.js';
import { DEFAULT_STOP_TIMEOUT_MS, InstanceOwner, type StartPlan, type FileOpRequest } from './owner.js';

const RUN_TIMEOUT_MS = 30_000;
/** Operations a stop or delete may cut short. */
const CANCELLABLE = ['start', 'restart'] as const;

export class Instance extends InstanceOwner {
  /** The last CPU sample of its VMM, for `stats` (CPU since the previous call). */
  private cpuSample: ProcessSample | undefined;
  private readonly guestEgress = new GuestEgress(this.id, this.s);

  /** The create's start: boots the VM and starts the workload (see launch). */
  start(plan: StartPlan, signal?: AbortSignal): Promise<InstanceView> {
    return this.op('start', (row, s) => this.launch(row, plan, false, s), { signal, always: true });
  }

  /**
   * `docker restart`: stops the instance if it runs, then boots a new VM for it with the same
   * command, environment (secrets resolved again by name), image, network and host ports, on
   * its own disk, so what it wrote survives. Logs continue in the same store.
   */
  restart(signal?: AbortSignal): Promise<InstanceView> {
    return this.op(
      'restart',
      async (row, opSignal) => {
        if (isUp(row.state)) {
          await this.stopNow(row, DEFAULT_STOP_TIMEOUT_MS);
          row = this.row();
        }
        requireState(row.handle, row.state, ['stopped', 'failed'], 'restart');
        const secretEnv = this.s.secrets.environment(row.spec.secrets, identityOf(row), row.network === 'user').env;
        const image = row.image ? this.s.images.resolveDigest(row.image.digest) : undefined;
        if (!this.s.networkModes.includes(row.network)) {
          throw new AegisError('UNSUPPORTED', `the ${this.s.backend.name} backend cannot give this instance its network here`);
        }
        await this.s.mounts.recheck(row.volumes);
        const forwarder = await PortForwarder.listen(row.ports);
        try {
          // No await between the check and the move: a start of the same volume elsewhere sees this one.
          this.s.volumes.checkAttach(this.row().volumes, this.id);
          this.mustMove('starting', { exitCode: null, stateReason: null, startedAt: null, stoppedAt: null });
        } catch (err) {
          forwarder.close();
          throw err;
        }
        this.s.log.info(`instance ${row.handle} (${this.id}): restarting`);
        if (row.spec.timeoutMs !== undefined) this.setDeadline(row.spec.timeoutMs);
        const env = { ...imageEnv(image?.config), ...row.spec.env, ...secretEnv };
        return this.launch(this.row(), { forwarder, image, env }, true, opSignal);
      },
      { signal },
    );
  }

  /**
   * Boots the VM (from the pool, warm from a template when one fits and the disk is new, else
   * cold), serves its ports, and starts its workload. When `signal` aborts (a stop or delete
   * queued behind, or the caller gone), whatever it booted is ended before it returns.
   */
  private async launch(row: InstanceRow, plan: StartPlan, keepDisk: boolean, signal: AbortSignal): Promise<InstanceView> {
    const { handle } = row;
    const { forwarder, image, pooled } = plan;
    const startedAt = performance.now();
    let kind = 'cold';
    try {
      signal.throwIfAborted();
      await fs.mkdir(path.join(this.dir, 'vm'), { recursive: true, mode: 0o700 });
      const shape = plan.shape ?? (await machineShape(this.s.config, row.memoryMiB, row.vcpuCount, row.network, image));
      // A restart keeps the instance's disk (its writes), so it boots cold on that disk. So does
      // an instance with volumes: a machine restored from a template cannot gain devices.
      const volumes = this.s.volumes.vmVolumes(row.volumes);
      const checkpoint = keepDisk ? undefined : plan.checkpoint;
      const template = pooled || keepDisk || checkpoint || volumes.length > 0 ? undefined : this.s.templates.lookup(shape);
      kind = pooled ? 'pool' : checkpoint ? 'snapshot' : template ? 'template' : 'cold';
      let agent: AgentConnection;
      try {
        agent = pooled
          ? await this.fromPool(row, pooled, signal)
          : await this.boot(
              row,
              {
                shape,
                template,
                keepDisk,
                volumes,
                ...(checkpoint ? { checkpoint: { state: checkpoint.state, disk: checkpoint.disk, machine: checkpoint.meta.machine } } : {}),
              },
              signal,
            );
      } catch (err) {
        if ((!template && !pooled) || signal.aborted) throw err;
        // A template or pooled VM that fails must not break instances: set it aside, boot cold.
        this.s.log.warn(
          `instance ${handle} (${this.id}): ${pooled ? 'pooled VM' : 'warm boot'} failed (${(err as Error).message}); booting cold`,
        );
        kind = 'cold';
        const failed = this.live;
        if (failed) {
          failed.retired = true;
          this.live = undefined;
          await failed.kill();
        } else await pooled?.vm.stop({ timeoutMs: 0 }).catch(() => undefined);
        if (template) await this.s.templates.discard(template);
        this.s.registry.updateInstance(this.id, { vmRecord: null });
        agent = await this.boot(row, { shape, volumes }, signal);
      }
      signal.throwIfAborted();
      if (this.live) this.serve(this.live, forwarder);
      // Secrets brokered at egress: the broker holds their values, the guest trusts its CA.
      const broker = await this.guestEgress.ensureBroker(row);
      if (broker) await agent.call('trust', { caPem: broker.caPem }, { timeoutMs: 15_000, signal });
      if (checkpoint) {
        // Its workload carries on where the checkpoint caught it: nothing to run.
        this.move('running', { startedAt: Date.now() }, ['starting']);
        this.s.metrics.started(kind, (performance.now() - startedAt) / 1000);
        return this.view();
      }
      const params = {
        command: row.command,
        env: broker ? { ...plan.env, ...TRUST_ENV } : plan.env,
        ...(row.workdir ? { workdir: row.workdir } : {}),
        ...(row.spec.user !== undefined ? { user: row.spec.user } : {}),
        ...(row.spec.stdin ? { stdin: true } : {}),
        ...(row.spec.tty ? { tty: row.spec.tty } : {}),
        ...(image ? { image: image.config.user ? { user: image.config.user } : {} } : {}),
      };
      await agent.call('run', params, { timeoutMs: RUN_TIMEOUT_MS, signal });
      this.move('running', { startedAt: Date.now() }, ['starting']);
      this.s.metrics.started(kind, (performance.now() - startedAt) / 1000);
      return this.view();
    } catch (err) {
      const cancelled = signal.aborted;
      const e = cancelled ? AegisError.from(signal.reason ?? err, 'CANCELLED') : AegisError.from(err);
      const live = this.live;
      const tail = e.code === 'TIMEOUT' && live ? await live.vm.consoleTail(1500) : '';
      this.s.log.warn(
        `instance ${handle} (${this.id}): start ${cancelled ? 'cancelled' : 'failed'}: ${e.message}${tail ? `\n--- console ---\n${tail}` : ''}`,
      );
      this.move(
        cancelled ? 'stopped' : 'failed',
        { stateReason: cancelled ? `stopped while starting (${e.message})` : `start failed: ${e.message}`, stoppedAt: Date.now() },
        ['starting'],
      );
      // Whatever booted is ended before this operation returns; a pooled VM never followed too.
      if (live) await this.kill(live);
      else await pooled?.vm.stop({ timeoutMs: 0 }).catch(() => undefined);
      forwarder.close();
      throw e;
    }
  }

  /**
   * Starts the VM (warm from `template`: restore + `fresh`, else cold) and returns once its
   * harness answers. It is followed before anything can fail, so a cancel always finds it.
   */
  private async boot(row: InstanceRow, plan: Omit<VmPlan, 'id' | 'handle' | 'dir'>, signal: AbortSignal): Promise<AgentConnection> {
    const t0 = Date.now();
    const phases: string[] = [];
    const phase = (name: string): void => void phases.push(`${name} ${Date.now() - t0}`);
    const vm = await startVm(this.s, { id: this.id, handle: row.handle, dir: this.dir, ...plan }, signal);
    const restored = plan.template !== undefined || plan.checkpoint !== undefined;
    phase(restored ? 'restored' : 'vmm started');
    this.s.registry.updateInstance(this.id, { vmRecord: vm.record() });
    const live = this.follow(vm, row.handle);
    signal.throwIfAborted();
    const agent = await live.connectAgent(this.s.config.bootTimeoutMs, signal);
    phase('agent ready');
    if (restored) {
      await agent.call('fresh', freshIdentity(row.handle), { timeoutMs: 15_000, signal });
      phase('fresh');
    }
    if (!live.agent) throw new AegisError('UNAVAILABLE', 'agent channel closed during boot');
    const how = plan.checkpoint ? 'from a snapshot' : plan.template ? 'warm boot' : 'cold boot';
    this.s.log.info(`instance ${row.handle} (${this.id}): ${how}, ms: ${phases.join(', ')}`);
    return agent;
  }

  /**
   * Makes a pooled VM this instance's: followed as any instance's VM, with the pool's agent
   * channel handed over before the guest runs again (nothing it says is lost), then resumed
   * and given its identity before any of the instance's own work reaches it.
   */
  private async fromPool(row: InstanceRow, pooled: PooledVm, signal: AbortSignal): Promise<AgentConnection> {
    const t0 = Date.now();
    this.s.registry.updateInstance(this.id, { vmRecord: pooled.vm.record() });
    const live = this.follow(pooled.vm, row.handle);
    live.adoptAgent(pooled.agent);
    await pooled.vm.resume();
    const resumedMs = Date.now() - t0;
    await pooled.agent.call('fresh', freshIdentity(row.handle), { timeoutMs: 15_000, signal });
    if (!live.agent) throw new AegisError('UNAVAILABLE', 'agent channel closed during start');
    this.s.log.info(`instance ${row.handle} (${this.id}): from the warm pool, ms: resumed ${resumedMs}, fresh ${Date.now() - t0}`);
    return pooled.agent;
  }

  /** Starts following a VM: its exit and its agent report to this owner. */
  private follow(vm: Vm, handle: string): LiveInstance {
    const live = new LiveInstance(this.id, handle, vm, new LogStore(path.join(this.dir, 'output.ndjson')), this, this.s.log);
    this.live = live;
    // Output of the workload or an exec is use (`--idle-pause`).
    live.logs.on('entry', () => this.idle.touch());
    return live;
  }

  /**
   * Forwards the exposed ports over the data channel of whichever VM the instance has (a
   * hibernated one has none until a connection wakes it), for as long as the instance lives.
   */
  private serve(live: LiveInstance | undefined, forwarder: PortForwarder): void {
    if (live) live.forwarder = forwarder;
    const asleep = (): boolean => this.live?.paused === true || this.row().state === 'hibernated';
    const handle = this.row().handle;
    forwarder.serve(
      () =>
        this.live ? this.live.vm.connectData() : Promise.reject(new AegisError('UNAVAILABLE', `instance ${handle} has no VM running`)),
      (err) => this.s.log.warn(`instance ${handle}: port listener: ${err.message}`),
      {
        // A new connection to an idle-paused or hibernated instance waits for it to wake (as accepted).
        admit: () => (asleep() ? this.wake('a connection').then(() => undefined) : Promise.resolve()),
        // Bytes either way are use; bytes from the host on an open connection wake it (they wait in the channel).
        traffic: (fromHost) => {
          this.idle.touch();
          if (fromHost && asleep()) void this.wake('a connection').catch(() => undefined);
        },
        egress: this.guestEgress.of(this.row()),
      },
    );
    // A running instance adopted by a restarted aegisd: its broker again (the guest trusts its CA already).
    if (this.row().state === 'running') {
      void this.guestEgress
        .ensureBroker(this.row())
        .catch((err: unknown) => this.s.log.warn(`instance ${handle}: egress broker: ${(err as Error).message}`));
    }
  }

  /**
   * `aegis hibernate`: the machine saved (memory and devices; its disk is its own and stays as
   * it is) and its VMM ended, so it costs no memory and no process; its host ports stay bound.
   * Any use restores it where it was (`restoreHibernated`), also after aegisd or the host restarts.
   */
  hibernate(signal?: AbortSignal, idle?: { reason: string }): Promise<InstanceView> {
    const reason = idle?.reason ?? 'hibernated by request';
    return this.op(
      'hibernate',
      async (queued, opSignal) => {
        // An idle hibernation finds it as it left it, or leaves it be (a use came meanwhile).
        if (idle && !(isIdlePaused(queued) || (queued.state === 'running' && this.idle.isIdle()))) {
          return this.view();
        }
        const row = await this.wakeNow(queued, 'hibernate');
        requireState(row.handle, row.state, ['running'], 'hibernate');
        const live = this.requireLive(row, 'hibernate');
        if (!live.vm.saveSnapshot) throw new AegisError('UNSUPPORTED', `the ${this.s.backend.name} backend cannot save a running VM`);
        if (row.spec.stdin || row.spec.tty) {
          throw new AegisError(
            'FAILED_PRECONDITION',
            `instance "${row.handle}" has its stdin or a terminal attached to a client; hibernation would cut it`,
          );
        }
        const saved = await saveHibernation(this.dir, live.vm, opSignal);
        // From here the VM's end is the instance's sleep, not its stop: its ports stay.
        this.sleepingPorts = live.forwarder;
        live.forwarder = undefined;
        live.retired = true;
        this.mustMove('hibernated', { stateReason: reason, vmRecord: null });
        await this.kill(live);
        this.s.log.info(`instance ${row.handle} (${this.id}): hibernated in ${saved.ms} ms (${saved.bytes} B)`);
        return this.view();
      },
      signal ? { signal } : {},
    );
  }

  protected async restoreHibernated(row: InstanceRow, why: string, signal?: AbortSignal): Promise<InstanceRow> {
    const t0 = Date.now();
    const saved = await readHibernation(this.dir);
    if (!saved) {
      await this.discardHibernation();
      this.mustMove('failed', { stateReason: 'its hibernation files are gone; start it again', stoppedAt: Date.now() });
      throw new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" cannot wake: its hibernation files are gone`);
    }
    // Saved under another VMM or CPU (an upgrade, another host): refused, never run; it stays
    // asleep for a daemon that can restore it, or is stopped.
    const mismatch = restoreMismatch(saved.machine, this.s.templates.vmmIdentity());
    if (mismatch) {
      throw new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" cannot wake here: ${mismatch}; stop it to start it afresh`);
    }
    const own = signal ?? new AbortController().signal;
    try {
      const shape = await machineShape(this.s.config, row.memoryMiB, row.vcpuCount, row.network, undefined);
      const vm = await startVm(
        this.s,
        {
          id: this.id,
          handle: row.handle,
          dir: this.dir,
          shape,
          keepDisk: true,
          checkpoint: { state: saved.state, disk: undefined, machine: saved.machine },
        },
        own,
      );
      this.s.registry.updateInstance(this.id, { vmRecord: vm.record() });
      const live = this.follow(vm, row.handle);
      const agent = await live.connectAgent(this.s.config.bootTimeoutMs, own);
      // The same machine: its clock and RNG, not its name or machine-id.
      await agent.call('fresh', { ...freshIdentity(row.handle), keepIdentity: true }, { timeoutMs: 15_000, signal: own });
      this.mustMove('running', { stateReason: null });
      const ports = this.sleepingPorts ?? (await PortForwarder.listen(row.ports));
      this.sleepingPorts = undefined;
      live.forwarder = ports;
      ports.reopen();
      await removeHibernation(this.dir);
      this.s.log.info(`instance ${row.handle} (${this.id}): woken from hibernation by ${why} in ${Date.now() - t0} ms`);
      this.s.metrics.woke('hibernation', (Date.now() - t0) / 1000);
      return this.row();
    } catch (err) {
      const e = AegisError.from(err);
      this.s.log.warn(`instance ${row.handle} (${this.id}): waking from hibernation failed: ${e.message}`);
      if (this.live) await this.kill(this.live);
      if (this.row().state === 'hibernated') {
        // A failed wake may be tried again (its files are kept); a broken machine says so.
        throw new AegisError(e.code === 'CANCELLED' ? 'CANCELLED' : 'UNAVAILABLE', `instance "${row.handle}" could not wake: ${e.message}`);
      }
      throw e;
    }
  }

  /**
   * A checkpoint of the running machine (`aegis snapshot create`, `fork`): paused only while
   * its memory and device state are written and its disk copied (one consistent point: the
   * VMM flushes the disk when it pauses), then it carries on. The copy is the snapshot's own,
   * so the instance may go on writing and be deleted.
   */
  checkpoint(name: string, auto: boolean, signal?: AbortSignal): Promise<Snapshot> {
    return this.op(
      'checkpoint',
      async (queued, opSignal) => {
        const row = await this.wakeNow(queued, 'checkpoint');
        requireState(row.handle, row.state, ['running'], 'checkpoint');
        const live = this.requireLive(row, 'checkpoint');
        const refused = checkpointRefusal(row);
        if (refused) throw refused;
        const disk = await existingDisk(this.dir);
        if (!disk) throw new AegisError('INTERNAL', `instance "${row.handle}" has no disk`);
        const snap = await saveCheckpoint({
          name,
          auto,
          row,
          identityOf: identityOf(row),
          vm: live.vm,
          backend: this.s.backend,
          machine: await readMachine(path.join(this.dir, 'vm')),
          disk,
          store: this.s.snapshots,
          log: this.s.log,
          signal: opSignal,
        });
        // A fork's own checkpoint is told by its `fork` event (the manager's).
        if (!auto) this.publish(row, { type: 'snapshot', state: row.state, snapshot: name });
        return snap;
      },
      signal ? { signal } : {},
    );
  }

  /** Stops the instance; a start in flight is cancelled first (nothing boots afterwards). */
  stop(timeoutMs = DEFAULT_STOP_TIMEOUT_MS, reason = 'stopped by request'): Promise<InstanceView> {
    return this.op(
      'stop',
      async (row) => {
        await this.stopNow(row, timeoutMs, reason);
        return this.view();
      },
      { cancels: CANCELLABLE },
    );
  }

  /** Deletes the instance; with `force` a live one is stopped first (a start in flight cancelled). */
  async delete(force: boolean): Promise<void> {
    const first = this.row();
    const refuse = (row: InstanceRow): AegisError =>
      new AegisError('FAILED_PRECONDITION', `instance "${row.handle}" is ${row.state}; stop it first or delete with --force`);
    if (isUp(first.state) && !force) throw refuse(first);
    await this.op(
      'delete',
      async (row) => {
        if (isUp(row.state)) {
          if (!force) throw refuse(row);
          await this.stopNow(row, 2000);
        }
        await this.removeNow();
      },
      force ? { cancels: CANCELLABLE } : {},
    );
  }

  /**
   * The creator of a throwaway instance went away (`run`'s connection dropped): it is stopped,
   * a start in flight cancelled, and `settle` removes it. A kept instance is left alone.
   */
  abandon(): void {
    if (this.s.registry.getInstance(this.id)?.spec.autoRemove) void this.stop(2000, 'its creator went away').catch(() => undefined);
  }

  pause(): Promise<InstanceView> {
    return this.op('pause', async (row) => {
      if (isIdlePaused(row)) {
        // Paused already, for idleness: now the user's pause, which use does not wake.
        this.s.registry.updateInstance(this.id, { stateReason: null });
        return this.view();
      }
      requireState(row.handle, row.state, ['running'], 'pause');
      const live = this.requireLive(row, 'pause');
      await live.vm.pause();
      live.paused = true;
      this.mustMove('paused');
      return this.view();
    });
  }

  resume(): Promise<InstanceView> {
    return this.op('resume', async (row, signal) => {
      if (row.state === 'hibernated') {
        await this.wakeNow(row, 'resume', signal);
        return this.view();
      }
      requireState(row.handle, row.state, ['paused'], 'resume');
      const live = this.requireLive(row, 'resume');
      await live.vm.resume();
      this.mustMove('running', isIdlePaused(row) ? { stateReason: null } : {});
      live.resumed();
      return this.view();
    });
  }

  /** Runs a command in the instance, calling `emit` for each event; resolves after `exit`. */
  async exec(req: ExecRequest, emit: ExecEmitter, signal?: AbortSignal): Promise<void> {
    if (req.detach && (req.stdin || req.tty)) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        'a detached exec has no client to read its stdin or drive its terminal: leave out stdin and tty',
      );
    }
    const execId = randomBytes(6).toString('hex');
    const execStarted = performance.now();
    // The guest's first output (even its exit) can arrive with the answer to `exec`, before
    // `started` is emitted below: held until then, so every stream begins with `started`.
    let startedSent = false;
    const early: Parameters<ExecEmitter>[0][] = [];
    const gated: ExecEmitter = (ev) => {
      if (startedSent) return emit(ev); // its promise is the stream's backpressure
      early.push(ev);
      return undefined;
    };
    // Admission is an operation of the instance (no stop can slip in between the check and
    // the guest starting the command); the command's output then streams outside the queue.
    const { agent, done } = await this.op(
      'exec',
      async (queued) => {
        const row = await this.wakeNow(queued, 'exec');
        requireState(row.handle, row.state, ['running'], 'exec in');
        const live = this.requireLive(row, 'exec in');
        const agent = live.agent;
        if (!agent) throw new AegisError('UNAVAILABLE', `agent of instance "${row.handle}" is not connected`);
        const done = live.trackExec(execId, gated);
        done.catch(() => undefined); // observed below; not an unhandled rejection meanwhile
        const took = (): number => (performance.now() - execStarted) / 1000;
        done.then(
          () => this.s.metrics.execEnded('exited', took()),
          () => this.s.metrics.execEnded('error', took()),
        );
        // An exec in progress is use, however quiet (`--idle-pause`); a detached one is a
        // background process of the instance, as the workload's own are.
        if (!req.detach) {
          const release = this.idle.hold();
          void done.then(release, release);
        }
        try {
          // In an image, exec runs as `docker exec` does: the image's env, user and working directory.
          const image = row.image ? this.s.images.resolveDigest(row.image.digest).config : undefined;
          const workdir = req.workdir ?? image?.workingDir;
          const secretEnv = this.guestEgress.secretEnv(row);
          const params = {
            execId,
            command: req.command,
            // As docker exec: the instance's environment (image, --env, secrets looked up again by name), then the exec's own.
            env: { ...imageEnv(image), ...row.spec.env, ...secretEnv, ...req.env },
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
      { signal },
    );
    emit({ type: 'started', execId });
    // In order: what arrives while these are written joins the queue behind them.
    for (let ev = early.shift(); ev; ev = early.shift()) await emit(ev);
    startedSent = true;
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

  /** Sends a signal to the workload, or to one exec. */
  async signal(signal: string, execId?: string): Promise<void> {
    const { agent } = await this.admit('signal', 'a signal');
    await agent.call('signal', execId === undefined ? { signal } : { execId, signal }, { timeoutMs: 10_000 });
  }

  /** Resizes the terminal of the workload (no execId) or of an exec. */
  async resize(execId: string | undefined, rows: number, cols: number): Promise<void> {
    const { agent } = await this.admit('resize a terminal in', 'a terminal resize');
    await agent.call('resize', { ...(execId !== undefined ? { execId } : {}), rows, cols }, { timeoutMs: 10_000 });
  }

  /** Feeds the stdin of the workload (no execId) or of an exec: base64 `data`, then optionally end of file. */
  async input(execId: string | undefined, data: string | undefined, eof: boolean): Promise<void> {
    const { agent } = await this.admit('write to', 'input');
    const params = { ...(execId !== undefined ? { execId } : {}), ...(data !== undefined ? { data } : {}), ...(eof ? { eof: true } : {}) };
    await agent.call('stdin', params, { timeoutMs: 30_000 });
  }

  /** The guest's processes (`docker top`). */
  async top(): Promise<PsResult> {
    const { agent } = await this.admit('list the processes of', 'top');
    return agent.call('ps', {}, { timeoutMs: 10_000 });
  }

  /**
   * One operation of the guest's file service (files API, `aegis cp`), in the instance's root
   * (its image's when it has one). The instance must be running: a paused guest cannot answer.
   */
  async files(req: FileOpRequest, body?: Readable, signal?: AbortSignal): Promise<FileResult> {
    // In progress until its bytes are through: not idle meanwhile (`--idle-pause`), and woken first.
    const release = this.idle.hold();
    try {
      const { row, live } = await this.admit('reach the files of', 'files');
      const forwarder = live.forwarder;
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
   * A connection of aegisd's own to `guestPort` in the guest (the E2B endpoint's `getHost`),
   * over the data channel as `--expose` connections go; the instance is woken first, and the
   * connection counts as use.
   */
  async dial(guestPort: number): Promise<Duplex> {
    const { row, live } = await this.admit('connect to', 'a connection');
    const forwarder = live.forwarder;
    if (!forwarder) throw new AegisError('UNAVAILABLE', `instance "${row.handle}" is not serving its data channel yet`);
    this.idle.touch();
    return forwarder.open(guestPort);
  }

  egress(withLog: boolean): EgressView {
    return this.guestEgress.view(this.row(), withLog);
  }

  /** Adds rules (for new connections and queries at once), kept for restarts and a restarted aegisd. */
  updateEgress(change: EgressPolicy): EgressView {
    return this.guestEgress.update(this.row(), change);
  }

  /** What the instance costs and uses (`docker stats`); the guest's own figures are absent while paused. */
  async stats(): Promise<InstanceStats> {
    const row = this.row();
    requireState(row.handle, row.state, ['running', 'paused'], 'measure');
    const live = this.requireLive(row, 'measure');
    const guest =
      row.state === 'running' && live.agent ? await live.agent.call('stats', {}, { timeoutMs: 5000 }).catch(() => undefined) : undefined;
    const disk = await existingDisk(this.dir);
    const { stats, sample } = await measure(row, live.vm.hostPid(), disk?.path, guest, this.cpuSample);
    this.cpuSample = sample;
    return stats;
  }

  /**
   * What `/metrics` reads of it: host figures from /proc and its disk file, the guest's own
   * only while it runs (a scrape must not wake it, nor count as use), its egress counters.
   */
  async figures(): Promise<InstanceFigures> {
    const row = this.row();
    const live = this.live;
    const pid = live?.vm.hostPid();
    const [cpu, memory, disk] = await Promise.all([
      pid !== undefined ? sampleCpu(pid) : undefined,
      pid !== undefined ? processMemoryBytes(pid) : undefined,
      existingDisk(this.dir).then((d) => (d ? allocatedBytes(d.path) : undefined)),
    ]);
    const guest =
      row.state === 'running' && live?.agent && !live.paused
        ? await live.agent.call('stats', {}, { timeoutMs: 2000 }).catch(() => undefined)
        : undefined;
    const egress = this.guestEgress.view(row, false).counters;
    const sum = (k: 'bytesOut' | 'bytesIn' | 'allowed' | 'denied'): number => egress.reduce((a, c) => a + c[k], 0);
    return {
      cpuSeconds: cpu ? cpu.cpuTicks / 100 : undefined,
      hostMemoryBytes: memory,
      diskAllocatedBytes: disk,
      guestMemoryUsedBytes: guest ? (guest.memTotalKiB - guest.memAvailableKiB) * 1024 : undefined,
      guestMemoryTotalBytes: guest ? guest.memTotalKiB * 1024 : undefined,
      egressBytesOut: sum('bytesOut'),
      egressBytesIn: sum('bytesIn'),
      egressAllowed: sum('allowed'),
      egressDenied: sum('denied'),
    };
  }

  /** The log store plus whether more output can still come. */
  logs(): { row: InstanceRow; store: LogStore; live: boolean } {
    const row = this.row();
    const store = this.live?.logs ?? new LogStore(path.join(this.dir, 'output.ndjson'));
    return { row, store, live: this.live !== undefined && isLive(row.state) };
  }

  /** Resolves once the instance is stopped or failed (`docker wait`), with how it ended. */
  async wait(signal?: AbortSignal): Promise<{ state: InstanceState; exitCode: number | null; stateReason?: string }> {
    for (;;) {
      const row = this.s.registry.getInstance(this.id);
      if (!row) throw new AegisError('NOT_FOUND', `instance ${this.id} was deleted while waited for`);
      // A hibernated one has not stopped: it waits, as a paused one does.
      if (!isUp(row.state)) {
        return { state: row.state, exitCode: row.exitCode, ...(row.stateReason ? { stateReason: row.stateReason } : {}) };
      }
      // Woken by the VM's end; the poll covers a start that has no VM yet, and a restart.
      const store = this.live?.logs;
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

  /**
   * Sets the deadline `timeoutMs` from now (0: none), as `aegis instance extend`. Not queued:
   * it touches only the timer, and must not wait behind a boot.
   */
  extend(timeoutMs: number): InstanceView {
    const row = this.row();
    requireState(row.handle, row.state, ['starting', 'running', 'paused'], 'set the deadline of');
    this.setDeadline(timeoutMs);
    return this.view();
  }

  /**
   * After a daemon restart: takes over the VM an earlier daemon started if it still runs; a
   * start caught half-way is failed (its caller has gone) and whatever it booted ended.
   */
  recover(): Promise<void> {
    return this.op('recover', async (row) => {
      if (isLive(row.state)) {
        if (!row.vmRecord || row.state === 'starting') {
          if (row.vmRecord) {
            const vm = await this.s.backend.attach(row.vmRecord).catch(() => undefined);
            await vm?.stop({ timeoutMs: 1000 }).catch(() => undefined);
          }
          this.move('failed', { stateReason: 'aegisd stopped while the instance was starting', stoppedAt: Date.now(), vmRecord: null });
        } else {
          let vm: Vm | undefined;
          try {
            vm = await this.s.backend.attach(row.vmRecord);
          } catch (err) {
            const clean = row.state === 'stopping' || row.exitCode !== null;
            this.move(clean ? 'stopped' : 'failed', {
              stateReason: `VM ended while aegisd was not running (${(err as Error).message})`,
              stoppedAt: Date.now(),
              vmRecord: null,
            });
          }
          if (vm) await this.adopt(row, vm);
        }
      }
      if (row.state === 'hibernated') {
        // No VM to find: its ports are bound again, and any use wakes it.
        const ports = await PortForwarder.listen(row.ports).catch(async (err: unknown) => {
          this.s.log.warn(`instance ${row.handle}: ports not restored: ${(err as Error).message}`);
          return PortForwarder.listen([]);
        });
        this.sleepingPorts = ports;
        this.serve(undefined, ports);
      }
      this.armFromRow();
    });
  }

  /**
   * Takes over a running VM. Its agent is connected in the background: the daemon serves
   * requests at once, however many guests are slow to answer. A paused guest cannot answer at
   * all: its channel is connected without waiting, and checked on resume.
   */
  private async adopt(row: InstanceRow, vm: Vm): Promise<void> {
    const live = this.follow(vm, row.handle);
    live.paused = row.state === 'paused';
    // The same host ports as before (connections that were open did not survive), and the data
    // channel the files API uses, ports or not.
    const forwarder = await PortForwarder.listen(row.ports).catch(async (err: unknown) => {
      this.s.log.warn(`instance ${row.handle}: ports not restored: ${(err as Error).message}`);
      return PortForwarder.listen([]);
    });
    this.serve(live, forwarder);
    void live.connectAgent(15_000).then(
      () => {
        this.s.log.info(`instance ${row.handle} (${this.id}): reattached (${row.state})`);
        if (row.state === 'stopping') void this.stop(1000).catch(() => undefined);
      },
      (err: unknown) => {
        this.s.log.warn(`instance ${row.handle}: agent did not answer after reattach: ${(err as Error).message}`);
        if (!live.paused) void this.stop(1000, 'its agent did not answer after aegisd restarted').catch(() => undefined);
      },
    );
  }
}
