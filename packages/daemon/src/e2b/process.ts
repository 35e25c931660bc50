/**
 * envd's Process service over instance execs. A process is an exec of the sandbox's instance
 * (`Instance.exec`, as `aegis exec` runs one); its pid is ours (a number per process, unique
 * in this aegisd), kept in a table with the exec's id so that later calls (SendInput,
 * SendSignal, Update, Connect, List) find it. As in envd, a process outlives the stream that
 * started it (a client that disconnects leaves it running; `Connect` reattaches), and the
 * call's deadline (the SDK's `timeoutMs`) kills it.
 */
import type { HandlerContext, ServiceImpl } from '@connectrpc/connect';
import { Code, ConnectError } from '@connectrpc/connect';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import type { ExecEvent, ExecRequest } from '../instances/spec.js';
import type { Instance } from '../instances/instance.js';
import { Channel } from './channel.js';
import { connectError } from './errors.js';
import { cutConnection, guestPath, homeOf, RAW_REQUEST, sandboxInstance, SANDBOX_ID_HEADER, userOf } from './context.js';
import {
  Process,
  Signal,
  type ProcessEvent_EndEventSchema,
  type ProcessEventSchema,
  type ProcessSelector,
  type ProcessInput,
} from './gen/process/process_pb.js';

type EventInit = MessageInitShape<typeof ProcessEventSchema>;
type EndInit = MessageInitShape<typeof ProcessEvent_EndEventSchema>;

interface Proc {
  pid: number;
  instanceId: string;
  instance: Instance;
  execId: string;
  tag: string | undefined;
  tty: boolean;
  config: { cmd: string; args: string[]; envs: Record<string, string>; cwd?: string };
  /** The streams following it, each with a way to cut its connection. */
  listeners: Map<Channel<EventInit>, () => void>;
  ended: boolean;
}

/** envd's EndEvent for our exit event: a signal is exit code -1 and `signal: NAME`, as Go reports it. */
export function endOf(ev: { exitCode: number | null; signal: string | null }): EndInit {
  if (ev.signal !== null) {
    const name = ev.signal.replace(/^SIG/, '').toLowerCase();
    const word = name === 'kill' ? 'killed' : name === 'term' ? 'terminated' : name === 'int' ? 'interrupt' : name;
    return { exitCode: -1, exited: false, status: `signal: ${word}`, error: `signal: ${word}` };
  }
  const code = ev.exitCode ?? -1;
  return { exitCode: code, exited: true, status: `exit status ${code}`, ...(code !== 0 ? { error: `exit status ${code}` } : {}) };
}

/** The processes the endpoint started, by pid. */
export class ProcessTable {
  private nextPid = 1000;
  private readonly procs = new Map<number, Proc>();

  add(p: Omit<Proc, 'pid' | 'listeners' | 'ended' | 'execId'>): Proc {
    const proc: Proc = { ...p, pid: this.nextPid++, execId: '', listeners: new Map(), ended: false };
    this.procs.set(proc.pid, proc);
    return proc;
  }

  find(instanceId: string, sel: ProcessSelector | undefined): Proc {
    const s = sel?.selector;
    let proc: Proc | undefined;
    if (s?.case === 'pid') proc = this.procs.get(s.value);
    else if (s?.case === 'tag') proc = [...this.procs.values()].find((p) => p.tag === s.value && p.instanceId === instanceId);
    else throw new AegisError('INVALID_ARGUMENT', 'a process selector (pid or tag) is required');
    if (!proc || proc.instanceId !== instanceId || proc.ended) {
      throw new AegisError('NOT_FOUND', `process ${s.case === 'pid' ? s.value : JSON.stringify(s.value)} not found`);
    }
    return proc;
  }

  of(instanceId: string): Proc[] {
    return [...this.procs.values()].filter((p) => p.instanceId === instanceId && !p.ended);
  }

  /** Sends `ev` to every attached stream; a promise while one of them is behind. */
  broadcast(proc: Proc, ev: EventInit, size: number): Promise<void> | undefined {
    const waits = [...proc.listeners.keys()].map((c) => c.push(ev, size)).filter((w) => w !== undefined);
    return waits.length > 0 ? Promise.all(waits).then(() => undefined) : undefined;
  }

  /**
   * Its sandbox went away under it: each stream's connection is cut, as E2B's proxy does when a
   * sandbox dies, and the SDK then finds the sandbox gone (/health) and says so (TimeoutError).
   */
  cut(proc: Proc): void {
    if (proc.ended) return;
    proc.ended = true;
    this.procs.delete(proc.pid);
    for (const [c, cut] of proc.listeners) {
      cut();
      c.end();
    }
    proc.listeners.clear();
  }

  finish(proc: Proc, end: EndInit): void {
    if (proc.ended) return;
    proc.ended = true;
    this.procs.delete(proc.pid);
    for (const c of proc.listeners.keys()) {
      c.push({ event: { case: 'end', value: end } });
      c.end();
    }
    proc.listeners.clear();
  }
}

/** Seconds between keepalive events the client asked for (`Keepalive-Ping-Interval`). */
function keepaliveMs(ctx: HandlerContext): number | undefined {
  const v = Number(ctx.requestHeader.get('keepalive-ping-interval'));
  return Number.isFinite(v) && v > 0 ? Math.max(1, v) * 1000 : undefined;
}

/**
 * Streams a process's events to one client until it ends, the client leaves, or the call's
 * deadline passes (which kills the process, as envd does).
 */
async function* follow(
  table: ProcessTable,
  proc: Proc,
  chan: Channel<EventInit>,
  ctx: HandlerContext,
): AsyncGenerator<{ event: EventInit }> {
  const keepalive = keepaliveMs(ctx);
  const ping = keepalive ? setInterval(() => chan.push({ event: { case: 'keepalive', value: {} } }), keepalive) : undefined;
  const remaining = ctx.timeoutMs();
  let timedOut = false;
  const deadline =
    remaining !== undefined
      ? setTimeout(
          () => {
            timedOut = true;
            void proc.instance.signal('SIGKILL', proc.execId).catch(() => undefined);
            chan.end(new ConnectError(`the command ran longer than its timeoutMs and was killed`, Code.DeadlineExceeded));
          },
          Math.max(0, remaining - 50),
        )
      : undefined;
  const onAbort = (): void => chan.end();
  ctx.signal.addEventListener('abort', onAbort, { once: true });
  try {
    for await (const ev of chan) yield { event: ev };
  } finally {
    if (ping) clearInterval(ping);
    if (deadline) clearTimeout(deadline);
    ctx.signal.removeEventListener('abort', onAbort);
    proc.listeners.delete(chan);
    void timedOut;
  }
}

export function processService(d: DaemonContext, table: ProcessTable): ServiceImpl<typeof Process> {
  const sandbox = (ctx: HandlerContext): Instance => sandboxInstance(d, ctx.requestHeader.get(SANDBOX_ID_HEADER));
  const wrap = async <T>(f: () => Promise<T>): Promise<T> => {
    try {
      return await f();
    } catch (err) {
      throw connectError(err);
    }
  };
  const input = async (instance: Instance, proc: Proc, inp: ProcessInput | undefined): Promise<void> => {
    const i = inp?.input;
    if (!i || i.case === undefined) throw new AegisError('INVALID_ARGUMENT', 'input (stdin or pty bytes) is required');
    await instance.input(proc.execId, Buffer.from(i.value).toString('base64'), false);
  };

  return {
    async *start(req, ctx) {
      let instance: Instance;
      let proc: Proc;
      const chan = new Channel<EventInit>();
      try {
        instance = sandbox(ctx);
        const cfg = req.process;
        if (!cfg || cfg.cmd === '') throw new AegisError('INVALID_ARGUMENT', 'process.cmd is required');
        const user = userOf(ctx.requestHeader.get('authorization'));
        const size = req.pty?.size;
        const tty = size ? { rows: Math.max(1, size.rows), cols: Math.max(1, size.cols) } : undefined;
        // envd starts a process in its user's home unless told otherwise.
        const workdir = cfg.cwd !== undefined && cfg.cwd !== '' ? guestPath(cfg.cwd, user) : homeOf(user);
        const execReq: ExecRequest = {
          command: [cfg.cmd, ...cfg.args],
          env: { ...cfg.envs },
          workdir,
          ...(user !== undefined ? { user } : {}),
          ...(tty ? { tty } : req.stdin === true ? { stdin: true } : {}),
        };
        proc = table.add({
          instanceId: instance.id,
          instance,
          tag: req.tag,
          tty: tty !== undefined,
          config: { cmd: cfg.cmd, args: [...cfg.args], envs: { ...cfg.envs }, ...(cfg.cwd ? { cwd: cfg.cwd } : {}) },
        });
        proc.listeners.set(chan, () => cutConnection(ctx.values.get(RAW_REQUEST)));
        const p = proc;
        let started!: () => void;
        let failed!: (err: unknown) => void;
        const begun = new Promise<void>((resolve, reject) => {
          started = resolve;
          failed = reject;
        });
        const emit = (ev: ExecEvent): Promise<void> | undefined => {
          if (ev.type === 'started') {
            p.execId = ev.execId;
            started();
            return undefined;
          }
          if (ev.type === 'output') {
            const bytes = Buffer.from(ev.data, 'base64');
            const output = p.tty ? { case: 'pty' as const, value: bytes } : { case: ev.stream, value: bytes };
            return table.broadcast(p, { event: { case: 'data', value: { output } } }, bytes.length);
          }
          table.finish(p, endOf(ev));
          return undefined;
        };
        // No signal: the process is the sandbox's, not this stream's (envd's rule).
        // Ended without an exit status: its sandbox stopped under it.
        instance.exec(execReq, emit).then(
          () => table.cut(p),
          (err: unknown) => {
            failed(err);
            table.cut(p);
          },
        );
        await begun;
      } catch (err) {
        throw connectError(err);
      }
      yield { event: { event: { case: 'start', value: { pid: proc.pid } } } };
      yield* follow(table, proc, chan, ctx);
    },

    async *connect(req, ctx) {
      const chan = new Channel<EventInit>();
      let proc: Proc;
      try {
        const instance = sandbox(ctx);
        proc = table.find(instance.id, req.process);
        proc.listeners.set(chan, () => cutConnection(ctx.values.get(RAW_REQUEST)));
      } catch (err) {
        throw connectError(err);
      }
      yield { event: { event: { case: 'start', value: { pid: proc.pid } } } };
      yield* follow(table, proc, chan, ctx);
    },

    list(_req, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        return {
          processes: table.of(instance.id).map((p) => ({ pid: p.pid, ...(p.tag !== undefined ? { tag: p.tag } : {}), config: p.config })),
        };
      });
    },

    sendInput(req, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        await input(instance, table.find(instance.id, req.process), req.input);
        return {};
      });
    },

    streamInput(reqs, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        let proc: Proc | undefined;
        for await (const r of reqs) {
          if (r.event.case === 'start') proc = table.find(instance.id, r.event.value.process);
          else if (r.event.case === 'data') {
            if (!proc) throw new AegisError('INVALID_ARGUMENT', 'StreamInput must start with a start event');
            await input(instance, proc, r.event.value.input);
          }
        }
        return {};
      });
    },

    closeStdin(req, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        const proc = table.find(instance.id, req.process);
        await instance.input(proc.execId, undefined, true);
        return {};
      });
    },

    sendSignal(req, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        const proc = table.find(instance.id, req.process);
        const name = req.signal === Signal.SIGTERM ? 'SIGTERM' : req.signal === Signal.SIGKILL ? 'SIGKILL' : undefined;
        if (!name) throw new AegisError('INVALID_ARGUMENT', 'signal must be SIGTERM or SIGKILL');
        await instance.signal(name, proc.execId);
        return {};
      });
    },

    update(req, ctx) {
      return wrap(async () => {
        const instance = sandbox(ctx);
        const proc = table.find(instance.id, req.process);
        const size = req.pty?.size;
        if (size) {
          if (!proc.tty) throw new AegisError('FAILED_PRECONDITION', `process ${proc.pid} has no terminal to resize`);
          await instance.resize(proc.execId, Math.max(1, size.rows), Math.max(1, size.cols));
        }
        return {};
      });
    },
  };
}
