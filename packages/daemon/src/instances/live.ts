/**
 * The running VM of one instance: what cannot be stored in the registry (the VM handle, the
 * agent connection, execs waiting for output, the port forwarder, the open log store). It
 * reports what the guest and the VMM do through `LiveEvents`; the instance's owner decides
 * what that means for the instance's state.
 */
import { AegisError, type ExitEvent, type GuestEvents } from '@aegis/protocol';
import type { Vm, VmExit } from '@aegis/vmm';
import { escapeForLog, type Logger } from '../log.js';
import type { PortForwarder } from '../ports/forwarder.js';
import { AgentConnection } from './agent.js';
import type { LogStore } from './logs.js';
import type { ExecEvent } from './spec.js';

/** After the guest agreed to power off, how long it has to do so before the VMM is stopped by force. */
const POWEROFF_GRACE_MS = 5000;
/** How long past the workload's own deadline the harness has to answer `shutdown`. */
const ANSWER_GRACE_MS = 1000;
/** An agent channel that drops while the VM lives is reconnected within this long, or the VM is ended. */
const AGENT_RECONNECT_MS = 15_000;

export interface LiveEvents {
  /** The workload exited (the guest's `exit` event). */
  onWorkloadExit(live: LiveInstance, exit: ExitEvent): void;
  /** The VMM process is gone, for any reason (`vmExit` says how). Called once. */
  onVmExit(live: LiveInstance, exit: VmExit): void;
}

interface ExecSink {
  emit: ExecEmitter;
  fail: (err: AegisError) => void;
}

/**
 * Where an exec's events go (an HTTP response). A promise means "congested until it
 * resolves": the agent channel is paused meanwhile, which pushes back to the guest, so a slow
 * client slows the command instead of growing aegisd's memory.
 */
export type ExecEmitter = (ev: ExecEvent) => void | Promise<void>;

export class LiveInstance {
  agent: AgentConnection | undefined;
  readonly execs = new Map<string, ExecSink>();
  /** The workload's exit, once the guest reported it. */
  exit: ExitEvent | undefined;
  forwarder: PortForwarder | undefined;
  /** Replaced by another VM for the same instance (a warm boot that fell back to cold). */
  retired = false;
  /** How the VMM process ended, once it has. */
  vmExit: VmExit | undefined;
  /** The owner has recorded this VM's end (it does so once, whoever sees it first). */
  recorded = false;
  /** Resolves after the VM's exit has been handled. */
  readonly finished: Promise<void>;
  private vmGone = false;
  /** Why the agent channel is paused (a congested log store, a slow exec client). */
  private readonly holds = new Set<string>();
  /** Powering off: backpressure no longer holds the channel (the shutdown reply must pass). */
  private ending = false;
  /** Output bytes received per process and stream, checked against the guest's own count. */
  private readonly received = new Map<string, number>();

  constructor(
    readonly id: string,
    readonly handle: string,
    readonly vm: Vm,
    readonly logs: LogStore,
    private readonly events: LiveEvents,
    private readonly log: Logger,
  ) {
    this.finished = vm.exited.then((exit) => {
      this.vmGone = true;
      this.vmExit = exit;
      this.agent?.close();
      this.failExecs(new AegisError('UNAVAILABLE', `instance ${handle} stopped during exec`));
      if (!this.retired) this.forwarder?.close();
      events.onVmExit(this, exit);
    });
  }

  /**
   * The guest is frozen (paused): it cannot answer, so a dropped channel is opened again only
   * once it runs, and an adopted paused VM's channel is connected without waiting for an answer.
   */
  paused = false;

  /** Connects the agent channel and waits until the harness answers (not while paused). */
  async connectAgent(timeoutMs: number, signal?: AbortSignal): Promise<AgentConnection> {
    const stream = await this.vm.connectAgent(signal);
    const agent = new AgentConnection(
      stream,
      (event, params) => this.onAgentEvent(event, params),
      (err) => this.onProtocolError(err),
    );
    this.useAgent(agent);
    try {
      if (!this.paused) await agent.waitReady(timeoutMs, signal);
    } catch (err) {
      agent.close();
      throw err;
    }
    // Backpressure applies to output, never to the handshake.
    if (this.holds.size > 0 && !this.ending) agent.pause();
    return agent;
  }

  /** Takes over a channel that is already connected and answering (a VM from the warm pool). */
  adoptAgent(agent: AgentConnection): void {
    agent.handOver(
      (event, params) => this.onAgentEvent(event, params),
      (err) => this.onProtocolError(err),
    );
    this.useAgent(agent);
  }

  private useAgent(agent: AgentConnection): void {
    this.agent = agent;
    void agent.closed.then(() => this.onAgentClosed(agent));
  }

  private onProtocolError(err: AegisError): void {
    this.log.warn(`instance ${this.handle}: bad message from guest: ${err.message}`);
  }

  /**
   * The channel dropped while the VM lives (a guest that closed its port, a harness restart):
   * execs waiting on it would never hear their exit, so they fail now; then the channel is
   * opened again, and a guest that does not answer any more has its VM ended.
   */
  private onAgentClosed(agent: AgentConnection): void {
    if (this.agent !== agent) return;
    this.agent = undefined;
    this.failExecs(new AegisError('UNAVAILABLE', `the agent channel of instance ${this.handle} closed during exec`));
    if (this.vmGone || this.retired) return;
    if (agent.closedForProtocolErrors) {
      // A guest that broke the protocol that often is not given a new channel to break.
      this.log.warn(`instance ${this.handle}: agent channel closed for protocol errors; ending the VM`);
      void this.vm.stop({ timeoutMs: 2000 }).catch(() => undefined);
      return;
    }
    void this.reconnect();
  }

  /** The guest runs again: a channel that dropped while it was frozen is opened now. */
  resumed(): void {
    this.paused = false;
    if (!this.agent && !this.vmGone && !this.retired) void this.reconnect();
  }

  private reconnecting = false;

  private async reconnect(): Promise<void> {
    if (this.reconnecting) return;
    this.reconnecting = true;
    try {
      await this.reconnectOnce();
    } finally {
      this.reconnecting = false;
    }
  }

  private async reconnectOnce(): Promise<void> {
    await new Promise((r) => setTimeout(r, 100));
    if (this.vmGone || this.agent || this.paused) return;
    try {
      await this.connectAgent(AGENT_RECONNECT_MS);
      this.log.warn(`instance ${this.handle}: agent channel closed and was reconnected`);
    } catch (err) {
      if (this.vmGone || this.paused) return; // gone, or frozen meanwhile: tried again on resume
      this.log.warn(`instance ${this.handle}: agent channel lost (${escapeForLog((err as Error).message)}); ending the VM`);
      await this.vm.stop({ timeoutMs: 2000 }).catch(() => undefined);
    }
  }

  /** Ends every exec waiting on this VM with `err` (the VM is going, for the reason it says). */
  failExecs(err: AegisError): void {
    for (const sink of this.execs.values()) sink.fail(err);
    this.execs.clear();
  }

  /** Registers an exec; the promise settles with its exit or when the VM or channel goes. */
  trackExec(execId: string, emit: ExecEmitter): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.execs.set(execId, {
        emit: (ev) => {
          const congested = emit(ev);
          if (ev.type === 'exit') resolve();
          return congested;
        },
        fail: reject,
      });
    });
  }

  private hold(reason: string, until: Promise<unknown>): void {
    if (this.holds.has(reason) || this.ending) return;
    this.holds.add(reason);
    if (this.holds.size === 1) this.agent?.pause();
    void until.finally(() => {
      this.holds.delete(reason);
      if (this.holds.size === 0) this.agent?.resume();
    });
  }

  private emitTo(execId: string, ev: ExecEvent): void {
    const congested = this.execs.get(execId)?.emit(ev);
    if (congested) this.hold(`exec ${execId}`, congested);
  }

  /** Compares what arrived with what the guest says it sent; a difference is a bug to see. */
  private account(execId: string | undefined, exit: { bytes?: { stdout: number; stderr: number }; truncated?: boolean }): void {
    const key = execId ?? '';
    const got = { stdout: this.received.get(`${key}:stdout`) ?? 0, stderr: this.received.get(`${key}:stderr`) ?? 0 };
    this.received.delete(`${key}:stdout`);
    this.received.delete(`${key}:stderr`);
    const what = execId === undefined ? 'the workload' : `exec ${execId}`;
    if (exit.bytes && (exit.bytes.stdout !== got.stdout || exit.bytes.stderr !== got.stderr)) {
      this.log.warn(
        `instance ${this.handle}: output of ${what} incomplete: guest sent ${exit.bytes.stdout}+${exit.bytes.stderr} bytes, host got ${got.stdout}+${got.stderr}`,
      );
    }
    if (exit.truncated)
      this.log.warn(`instance ${this.handle}: output of ${what} truncated: a background process kept its pipes open after it exited`);
  }

  private onAgentEvent<E extends keyof GuestEvents>(event: E, params: GuestEvents[E]): void {
    switch (event) {
      case 'output': {
        const ev = params as GuestEvents['output'];
        const data = Buffer.from(ev.data, 'base64');
        const key = `${ev.execId ?? ''}:${ev.stream}`;
        this.received.set(key, (this.received.get(key) ?? 0) + data.length);
        if (!this.logs.append(ev.stream, data, ev.execId)) {
          this.hold('logs', new Promise((r) => this.logs.once('drain', () => r(undefined))));
        }
        if (ev.execId !== undefined) this.emitTo(ev.execId, { type: 'output', stream: ev.stream, data: ev.data });
        return;
      }
      case 'execExit': {
        const ev = params as GuestEvents['execExit'];
        this.account(ev.execId, ev);
        this.emitTo(ev.execId, {
          type: 'exit',
          exitCode: ev.exitCode,
          signal: ev.signal,
          ...(ev.durationMs !== undefined ? { guestDurationMs: ev.durationMs } : {}),
          ...(ev.truncated ? { truncated: true } : {}),
        });
        this.execs.delete(ev.execId);
        return;
      }
      case 'exit': {
        // A guest may repeat itself (a replayed exit after a reconnect): the first one counts.
        if (this.exit) return;
        this.account(undefined, params as GuestEvents['exit']);
        this.exit = params as GuestEvents['exit'];
        this.events.onWorkloadExit(this, this.exit);
        return;
      }
      case 'ready':
        return;
    }
  }

  /**
   * Asks the harness to end the VM (the workload gets `workloadTimeoutMs` after SIGTERM), and
   * forces the VMM down if the guest does not comply. A guest that has not even answered by
   * then (a frozen VMM, a broken harness) is killed at once, so a stop never takes much more
   * than its deadline; one that answered gets a few seconds to sync its disk and power off.
   */
  /**
   * Stops the workload (SIGTERM, SIGKILL after `workloadTimeoutMs`) and the VM; resolves with
   * how the workload ended when this ended it (143, 137, or its own code), as Docker records it.
   */
  async powerOff(workloadTimeoutMs: number): Promise<number | undefined> {
    // The VM is ending: its replies must get through, whoever reads slowly.
    this.ending = true;
    this.agent?.resume();
    let status: number | undefined;
    if (!this.vmGone) {
      const answered = await (
        this.agent?.call('shutdown', { timeoutMs: workloadTimeoutMs }, { timeoutMs: workloadTimeoutMs + ANSWER_GRACE_MS }) ??
        Promise.reject(new AegisError('UNAVAILABLE', 'no agent channel'))
      )
        .then((r) => {
          status = r.workloadExitStatus;
          return true;
        })
        .catch((err: unknown) => {
          this.log.warn(`instance ${this.handle}: shutdown request failed: ${escapeForLog((err as Error).message)}`);
          return false;
        });
      const exited = await Promise.race([
        this.vm.exited.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), answered ? POWEROFF_GRACE_MS : 0).unref()),
      ]);
      if (!exited) await this.vm.stop({ timeoutMs: answered ? 2000 : 0 });
    }
    await this.finished;
    return status;
  }

  /** Ends the VM at once (a start that was cancelled or failed). */
  async kill(): Promise<void> {
    await this.vm.stop({ timeoutMs: 1000 }).catch(() => undefined);
    await this.finished;
  }

  /** Lets go without stopping the VM (the daemon exits; the next one attaches). */
  detach(): void {
    this.retired = true;
    this.agent?.close();
    this.vm.detach();
  }
}
