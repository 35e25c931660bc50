/**
 * aegis-harness: the guest agent. aegis-init (PID 1, C) starts it once the filesystems are
 * mounted; it serves the JSON-RPC methods of the guest contract (@aegis/protocol guest.ts)
 * on the agent channel and runs the workload and exec'd commands. When it exits, aegis-init
 * ends the VM.
 */
import {
  AegisError,
  GUEST_PROTOCOL_VERSION,
  RpcPeer,
  exitStatus,
  isGuestMethod,
  parseParams,
  type ExecParams,
  type FreshParams,
  type ExitEvent,
  type GuestEvent,
  type GuestEvents,
  type GuestMethods,
  type RunParams,
  type ShutdownParams,
  type SignalParams,
  type StdinParams,
  type Stream,
} from '@aegis/protocol';
import { spawn } from 'node:child_process';
import { Channel } from './channel.js';
import { GuestProcess, OutputGate } from './processes.js';
import { guestStats, listProcesses } from './ps.js';
import { startFileService } from './files.js';
import { trustCa } from './trust.js';

/**
 * After the workload exits, how long we wait for the host's `shutdown` before powering off.
 * The exit travels behind the output still in the channel, which a host under load (or one
 * pushing back) may take a while to read; powering off early would lose the exit status.
 */
const UNACKED_EXIT_POWEROFF_MS = 60_000;
const DEFAULT_STOP_TIMEOUT_MS = 3_000;

/**
 * A volume aegis-init could not mount (`PATH: reason`). The workload must not run without it:
 * it would write to the scratch disk what it meant to keep, or read an empty directory.
 */
const VOLUME_ERROR = process.env['AEGIS_VOLUME_ERROR'];
delete process.env['AEGIS_VOLUME_ERROR'];

class Harness {
  private workload: GuestProcess | undefined;
  private readonly execs = new Map<string, GuestProcess>();
  private shuttingDown = false;
  private readonly freshener = new Freshener();
  /** Pauses every process's output while the channel to the host is congested. */
  private readonly gate = new OutputGate();
  readonly peer: RpcPeer;

  constructor(private readonly channel: Channel) {
    channel.onDrain(() => this.gate.resume());
    this.peer = new RpcPeer({
      send: (line) => {
        if (!channel.write(line)) this.gate.pause();
      },
      onRequest: (method, params) => this.handle(method, params),
      onNotification: (method) => console.error(`aegis-harness: unexpected notification ${method} from host`),
      onProtocolError: (err) => console.error(`aegis-harness: ${err.message}`),
    });
  }

  private async handle(method: string, raw: unknown): Promise<unknown> {
    if (!isGuestMethod(method)) throw new AegisError('UNSUPPORTED', `unknown method ${method}`);
    switch (method) {
      case 'run':
        return this.run(parseParams.run(raw));
      case 'exec':
        return this.exec(parseParams.exec(raw));
      case 'signal':
        return this.signal(parseParams.signal(raw));
      case 'stdin':
        return this.stdin(parseParams.stdin(raw));
      case 'fresh':
        return this.freshener.apply(parseParams.fresh(raw));
      case 'trust':
        return trustCa(parseParams.trust(raw).caPem).then(() => ({}));
      case 'resize': {
        const p = parseParams.resize(raw);
        this.target(p.execId).resize(p);
        return {};
      }
      case 'ps':
        parseParams.ps(raw);
        return listProcesses();
      case 'stats':
        parseParams.stats(raw);
        return guestStats();
      case 'health':
        return this.health();
      case 'shutdown':
        return this.shutdown(parseParams.shutdown(raw));
    }
  }

  /** A notification of the guest contract: its params must have the schema's type. */
  notify<E extends GuestEvent>(event: E, params: GuestEvents[E]): void {
    this.peer.notify(event, params);
  }

  private output(stream: Stream, data: Buffer, execId?: string): void {
    const base64 = data.toString('base64');
    this.notify('output', execId === undefined ? { stream, data: base64 } : { execId, stream, data: base64 });
  }

  private async run(p: RunParams): Promise<GuestMethods['run']['result']> {
    if (this.workload) throw new AegisError('ALREADY_EXISTS', 'the workload is already running; use exec for more commands');
    if (this.shuttingDown) throw new AegisError('FAILED_PRECONDITION', 'the VM is shutting down');
    if (VOLUME_ERROR !== undefined) throw new AegisError('FAILED_PRECONDITION', `volume ${VOLUME_ERROR.slice(0, 400)} (not mounted)`);
    const proc = await GuestProcess.start(
      p,
      {
        onOutput: (stream, data) => this.output(stream, data),
        onExit: (exit) => this.workloadExited(exit),
      },
      this.gate,
    );
    this.workload = proc;
    return { pid: proc.pid, startedAtMs: Date.now() };
  }

  private workloadExited(exit: ExitEvent): void {
    this.notify('exit', exit);
    // The host normally answers with `shutdown` at once; if it is away (restarting), give it
    // a while to collect the exit status, then power off anyway so no VM is left behind.
    setTimeout(() => void this.powerOff(), UNACKED_EXIT_POWEROFF_MS).unref();
  }

  private async exec(p: ExecParams): Promise<GuestMethods['exec']['result']> {
    const received = performance.now();
    if (this.execs.has(p.execId)) throw new AegisError('ALREADY_EXISTS', `exec ${p.execId} exists`);
    if (this.shuttingDown) throw new AegisError('FAILED_PRECONDITION', 'the VM is shutting down');
    const proc = await GuestProcess.start(
      { ...p, cgroupName: `exec-${p.execId.replace(/[^\w-]/g, '_')}` },
      {
        onOutput: (stream, data) => this.output(stream, data, p.execId),
        onExit: (exit) => {
          this.execs.delete(p.execId);
          this.notify('execExit', { execId: p.execId, ...exit, durationMs: Math.round(performance.now() - received) });
        },
      },
      this.gate,
    );
    this.execs.set(p.execId, proc);
    return { pid: proc.pid };
  }

  /** The workload (no execId) or one exec. */
  private target(execId: string | undefined): GuestProcess {
    const target = execId === undefined ? this.workload : this.execs.get(execId);
    if (!target) throw new AegisError('NOT_FOUND', execId === undefined ? 'no workload is running' : `no exec ${execId}`);
    return target;
  }

  private signal(p: SignalParams): Promise<Record<string, never>> {
    const target = this.target(p.execId);
    if (p.group) target.signalGroup(p.signal);
    else target.signal(p.signal);
    return Promise.resolve({});
  }

  private stdin(p: StdinParams): Promise<Record<string, never>> {
    this.target(p.execId).write(p.data === undefined ? undefined : Buffer.from(p.data, 'base64'), p.eof === true);
    return Promise.resolve({});
  }

  private health(): GuestMethods['health']['result'] {
    return {
      version: GUEST_PROTOCOL_VERSION,
      uptimeMs: Math.round(process.uptime() * 1000),
      workload: this.workload ? { pid: this.workload.pid, running: this.workload.running } : null,
    };
  }

  private async shutdown(p: ShutdownParams): Promise<GuestMethods['shutdown']['result']> {
    this.shuttingDown = true;
    const timeoutMs = p.timeoutMs ?? DEFAULT_STOP_TIMEOUT_MS;
    const [workload] = await Promise.all([this.workload, ...this.execs.values()].map((proc) => proc?.terminate(timeoutMs)));
    // Answer first, then go: the reply must reach the host before the VM ends. It carries how
    // the workload ended: its own exit event may still be waiting for its pipes to drain.
    setImmediate(() => void this.powerOff());
    return workload ? { workloadExitStatus: exitStatus(workload) } : {};
  }

  private async powerOff(): Promise<never> {
    await this.channel.drain();
    process.exit(0);
  }
}

/**
 * `aegis-init fresh` (clock, hostname, RNG reseed: things Node cannot do), started at boot and
 * left waiting on its stdin, so that a VM restored from a snapshot finds it already running.
 */
class Freshener {
  private child: ReturnType<typeof spawn> | undefined = this.startHelper();

  private startHelper(): ReturnType<typeof spawn> {
    const child = spawn('/aegis/init', ['fresh'], { stdio: ['pipe', 'ignore', 'pipe'] });
    child.on('error', () => undefined);
    return child;
  }

  apply(p: FreshParams): Promise<Record<string, never>> {
    const child = this.child ?? this.startHelper();
    this.child = undefined;
    // The next one (for a later `fresh`: a snapshot of this VM, say) is started a little after:
    // a spawn under emulation blocks for tens of ms, and the workload's own start comes next.
    // (The warm pool's warm-up outlasts the delay, so a pooled VM is paused with one waiting.)
    setTimeout(() => (this.child ??= this.startHelper()), 300).unref();
    return new Promise((resolve, reject) => {
      let err = '';
      child.stderr?.on('data', (c: Buffer) => (err += c.toString()));
      child.once('close', (code) =>
        code === 0 ? resolve({}) : reject(new AegisError('INTERNAL', err.trim() || `fresh exited with ${code}`)),
      );
      child.stdin?.end(
        Buffer.concat([Buffer.from(`${p.timeMs} ${p.hostname}${p.keepIdentity ? ' keep' : ''}\n`), Buffer.from(p.entropy, 'base64')]),
      );
    });
  }
}

function main(): void {
  const fd = Number(process.env['AEGIS_AGENT_FD']);
  if (!Number.isInteger(fd)) throw new Error('AEGIS_AGENT_FD is not set (aegis-init sets it)');
  delete process.env['AEGIS_AGENT_FD'];
  const channel = Channel.open(fd);
  const harness = new Harness(channel);
  channel.onData((chunk) => harness.peer.receive(chunk));
  // aegis-init holds the other end for the VM's whole life; losing it means init is gone.
  channel.onClose(() => process.exit(1));
  // Before `ready`: a host told the guest is ready may copy files at once.
  void startFileService()
    .catch((err: unknown) => console.error(`aegis-harness: file service: ${(err as Error).message}`))
    .finally(() => harness.notify('ready', { version: GUEST_PROTOCOL_VERSION }));
}

try {
  main();
} catch (err) {
  console.error(`aegis-harness: ${err instanceof Error ? err.message : String(err)}`);
  process.exit(1);
}
