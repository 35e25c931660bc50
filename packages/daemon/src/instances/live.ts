/**
 * The running VM of one instance: what cannot be stored in the registry (the VM handle, the
 * agent connection, execs waiting for output, the port forwarder, the open log store). It
 * reports what the guest and the VMM do through `LiveEvents`; the instance's owner decides
 * what that means for the instance's state.
 */
import { AegisError, type ExitEvent, type GuestEvents } from '@aegis/protocol';
import type { Vm, VmExit } from '@aegis/vmm';
import type { Logger } from '../log.js';
import type { PortForwarder } from '../ports/forwarder.js';
import { AgentConnection } from './agent.js';
import type { LogStore } from './logs.js';
import type { ExecEvent } from './spec.js';

/** After the guest was asked to power off, how long before the VMM is stopped by force. */
const POWEROFF_GRACE_MS = 10_000;
/** An agent channel that drops while the VM lives is reconnected within this long, or the VM is ended. */
const AGENT_RECONNECT_MS = 15_000;

export interface LiveEvents {
  /** The workload exited (the guest's `exit` event). */
  onWorkloadExit(live: LiveInstance, exit: ExitEvent): void;
  /** The VMM process is gone, for any reason. Called once. */
  onVmExit(live: LiveInstance, exit: VmExit): void;
}

interface ExecSink {
  emit: (ev: ExecEvent) => void;
  fail: (err: AegisError) => void;
}

export class LiveInstance {
  agent: AgentConnection | undefined;
  readonly execs = new Map<string, ExecSink>();
  /** The workload's exit, once the guest reported it. */
  exit: ExitEvent | undefined;
  forwarder: PortForwarder | undefined;
  /** Replaced by another VM for the same instance (a warm boot that fell back to cold). */
  retired = false;
  /** Resolves after the VM's exit has been handled. */
  readonly finished: Promise<void>;
  private vmGone = false;

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
      this.agent?.close();
      this.failExecs(new AegisError('UNAVAILABLE', `instance ${handle} stopped during exec`));
      if (!this.retired) this.forwarder?.close();
      events.onVmExit(this, exit);
    });
  }

  /** Connects the agent channel and waits until the harness answers. */
  async connectAgent(timeoutMs: number, signal?: AbortSignal): Promise<AgentConnection> {
    const stream = await this.vm.connectAgent(signal);
    const agent = new AgentConnection(
      stream,
      (event, params) => this.onAgentEvent(event, params),
      (err) => this.log.warn(`instance ${this.handle}: bad message from guest: ${err.message}`),
    );
    this.agent = agent;
    void agent.closed.then(() => this.onAgentClosed(agent));
    try {
      await agent.waitReady(timeoutMs, signal);
    } catch (err) {
      agent.close();
      throw err;
    }
    return agent;
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
    void (async () => {
      await new Promise((r) => setTimeout(r, 100));
      if (this.vmGone || this.agent) return;
      try {
        await this.connectAgent(AGENT_RECONNECT_MS);
        this.log.warn(`instance ${this.handle}: agent channel closed and was reconnected`);
      } catch (err) {
        if (this.vmGone) return;
        this.log.warn(`instance ${this.handle}: agent channel lost (${(err as Error).message}); ending the VM`);
        await this.vm.stop({ timeoutMs: 2000 }).catch(() => undefined);
      }
    })();
  }

  private failExecs(err: AegisError): void {
    for (const sink of this.execs.values()) sink.fail(err);
    this.execs.clear();
  }

  /** Registers an exec; the promise settles with its exit or when the VM or channel goes. */
  trackExec(execId: string, emit: (ev: ExecEvent) => void): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.execs.set(execId, {
        emit: (ev) => {
          emit(ev);
          if (ev.type === 'exit') resolve();
        },
        fail: reject,
      });
    });
  }

  private onAgentEvent<E extends keyof GuestEvents>(event: E, params: GuestEvents[E]): void {
    switch (event) {
      case 'output': {
        const ev = params as GuestEvents['output'];
        this.logs.append(ev.stream, Buffer.from(ev.data, 'base64'), ev.execId);
        if (ev.execId !== undefined) this.execs.get(ev.execId)?.emit({ type: 'output', stream: ev.stream, data: ev.data });
        return;
      }
      case 'execExit': {
        const ev = params as GuestEvents['execExit'];
        const sink = this.execs.get(ev.execId);
        this.execs.delete(ev.execId);
        sink?.emit({
          type: 'exit',
          exitCode: ev.exitCode,
          signal: ev.signal,
          ...(ev.durationMs !== undefined ? { guestDurationMs: ev.durationMs } : {}),
        });
        return;
      }
      case 'exit': {
        // A guest may repeat itself (a replayed exit after a reconnect): the first one counts.
        if (this.exit) return;
        this.exit = params as GuestEvents['exit'];
        this.events.onWorkloadExit(this, this.exit);
        return;
      }
      case 'ready':
        return;
    }
  }

  /** Asks the harness to end the VM; forces the VMM down if the guest does not comply. */
  async powerOff(workloadTimeoutMs: number): Promise<void> {
    if (!this.vmGone) {
      try {
        await this.agent?.call('shutdown', { timeoutMs: workloadTimeoutMs }, { timeoutMs: workloadTimeoutMs + 5000 });
      } catch (err) {
        this.log.warn(`instance ${this.handle}: shutdown request failed: ${(err as Error).message}`);
      }
      const exited = await Promise.race([
        this.vm.exited.then(() => true),
        new Promise<boolean>((r) => setTimeout(() => r(false), POWEROFF_GRACE_MS).unref()),
      ]);
      if (!exited) await this.vm.stop({ timeoutMs: 2000 });
    }
    await this.finished;
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
