import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../../daemon.js';
import type { InstanceView } from '../../instances/spec.js';
import { matches, type LogEnd, type LogEntry, type LogFilter, type LogStore } from '../../instances/logs.js';
import { validateBody } from '../validate.js';
import { boolQuery, intQuery, reply, startStream, STREAMED, type Route } from '../server.js';

/** How long a `run` with volumes waits for its throwaway instance to be removed before it returns anyway. */
const REMOVAL_WAIT_MS = 30_000;

function param(params: Record<string, string>, name: string): string {
  const v = params[name];
  if (v === undefined) throw new AegisError('INVALID_ARGUMENT', `missing ${name}`);
  return v;
}

export function instanceRoutes(d: DaemonContext): Route[] {
  const m = d.instances;
  return [
    {
      method: 'GET',
      path: '/v1/instances',
      handler: ({ query }) => {
        // `label=k` or `label=k=v`, repeatable: every one must hold (docker ps --filter label=…).
        const labels = query.getAll('label').map((l) => {
          const eq = l.indexOf('=');
          return eq < 0 ? { key: l } : { key: l.slice(0, eq), value: l.slice(eq + 1) };
        });
        const instances = m
          .list(boolQuery(query, 'all'))
          .filter((i) =>
            labels.every(
              (l) => i.labels !== undefined && Object.hasOwn(i.labels, l.key) && (l.value === undefined || i.labels[l.key] === l.value),
            ),
          );
        return Promise.resolve(reply('listInstances', 200, { instances }));
      },
    },
    {
      method: 'POST',
      path: '/v1/instances',
      handler: async ({ body, signal }) =>
        reply('createInstance', 201, await m.create(validateBody('CreateInstanceRequest', body), signal)),
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}',
      handler: ({ params }) => Promise.resolve(reply('getInstance', 200, m.get(param(params, 'ref')))),
    },
    {
      method: 'DELETE',
      path: '/v1/instances/{ref}',
      handler: async ({ params, query }) => {
        await m.deleteInstance(param(params, 'ref'), boolQuery(query, 'force'));
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/stop',
      handler: async ({ params, body }) => {
        const req = validateBody('StopRequest', body ?? {});
        return reply('stopInstance', 200, await m.instance(param(params, 'ref')).stop(req.timeoutMs));
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/pause',
      handler: async ({ params }) => reply('pauseInstance', 200, await m.instance(param(params, 'ref')).pause()),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/resume',
      handler: async ({ params }) => reply('resumeInstance', 200, await m.instance(param(params, 'ref')).resume()),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/restart',
      handler: async ({ params, signal }) => reply('restartInstance', 200, await m.instance(param(params, 'ref')).restart(signal)),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/hibernate',
      handler: async ({ params, signal }) => reply('hibernateInstance', 200, await m.instance(param(params, 'ref')).hibernate(signal)),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/exec',
      handler: async ({ params, body, signal, res }) => {
        const req = validateBody('ExecRequest', body);
        const instance = m.instance(param(params, 'ref'));
        if (req.detach) {
          // docker exec -d: answered once it runs; its output goes to the log only, and the
          // request's end (this client going away) is not the command's.
          let started: (execId: string) => void = () => undefined;
          const first = new Promise<string>((resolve) => (started = resolve));
          const run = instance.exec(req, (ev) => {
            if (ev.type === 'started') started(ev.execId);
            return undefined;
          });
          run.catch(() => undefined); // after the start, its end is the log's business
          return reply('execInstance', 201, { execId: await Promise.race([first, run.then(() => first)]) });
        }
        let write: ((ev: unknown) => Promise<void> | undefined) | undefined;
        // Errors before the exec starts are plain HTTP errors; after, the stream's last event.
        await instance.exec(
          req,
          (ev) => {
            write ??= startStream(res);
            // A promise while the client is behind: the guest is paused until it catches up.
            return write(ev);
          },
          signal,
        );
        res.end();
        return STREAMED;
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/input',
      handler: async ({ params, body }) => {
        const req = validateBody('ExecInputRequest', body);
        await m.instance(param(params, 'ref')).input(undefined, req.data, req.eof === true);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/resize',
      handler: async ({ params, body }) => {
        const req = validateBody('TtySize', body);
        await m.instance(param(params, 'ref')).resize(undefined, req.rows, req.cols);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/wait',
      handler: async ({ params, signal }) => reply('waitInstance', 200, await m.instance(param(params, 'ref')).wait(signal)),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/deadline',
      handler: ({ params, body }) => {
        const req = validateBody('DeadlineRequest', body);
        return Promise.resolve(reply('setDeadline', 200, m.instance(param(params, 'ref')).extend(req.timeoutMs)));
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/stats',
      handler: async ({ params }) => reply('instanceStats', 200, await m.instance(param(params, 'ref')).stats()),
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/egress',
      handler: ({ params, query }) =>
        Promise.resolve(reply('instanceEgress', 200, m.instance(param(params, 'ref')).egress(boolQuery(query, 'log')))),
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/egress',
      handler: ({ params, body }) => {
        const req = validateBody('EgressPolicy', body);
        return Promise.resolve(reply('updateEgress', 200, m.instance(param(params, 'ref')).updateEgress(req)));
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/top',
      handler: async ({ params }) => reply('topInstance', 200, await m.instance(param(params, 'ref')).top()),
    },
    {
      method: 'POST',
      path: '/v1/run',
      handler: async ({ body, signal, res }) => {
        const req = validateBody('CreateInstanceRequest', body);
        const inst = await m.create(req, signal);
        const instance = m.instance(inst.id);
        // From here the instance lives no longer than this request, if it was asked to be throwaway.
        let ended = false;
        signal.addEventListener('abort', () => !ended && instance.abandon(), { once: true });
        const write = startStream(res);
        write({ type: 'created', instance: inst });
        const { store, live } = instance.logs();
        // Its client waits on the workload, as on an exec: not paused for idleness meanwhile (--idle-pause).
        const release = instance.holdAwake();
        let end: LogEnd | undefined;
        // A throwaway instance's run ends at the workload's exit: the VM's teardown and the
        // instance's removal (the manager's, once it stops) go on after the caller has its
        // status. One that is kept is seen stopped when its run returns, as with Docker; so is
        // one with volumes (free again, and a named one's disk flushed, when run returns).
        const early = req.autoRemove === true && (req.volumes?.length ?? 0) === 0;
        if (live) end = await follow(store, write, signal, { execs: false }, undefined, early).finally(release);
        else {
          release();
          // It ended before we could follow it (a workload that exits at once).
          for await (const e of store.read(undefined, undefined, { execs: false })) await write({ type: 'output', ...e });
          end = store.exitInfo ?? endOf(instance.view());
        }
        // Not ended early: its owner removes it once its VM is down, before run returns, as it always was.
        if (end && req.autoRemove && !early) await Promise.race([instance.removed, new Promise((r) => setTimeout(r, REMOVAL_WAIT_MS))]);
        ended = true;
        if (end) write({ type: 'end', ...end });
        res.end();
        return STREAMED;
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/signal',
      handler: async ({ params, body }) => {
        const req = validateBody('SignalRequest', body);
        await m.instance(param(params, 'ref')).signal(req.signal);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/execs/{execId}/signal',
      handler: async ({ params, body }) => {
        const req = validateBody('SignalRequest', body);
        await m.instance(param(params, 'ref')).signal(req.signal, param(params, 'execId'));
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/execs/{execId}/resize',
      handler: async ({ params, body }) => {
        const req = validateBody('TtySize', body);
        await m.instance(param(params, 'ref')).resize(param(params, 'execId'), req.rows, req.cols);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/execs/{execId}/input',
      handler: async ({ params, body }) => {
        const req = validateBody('ExecInputRequest', body);
        await m.instance(param(params, 'ref')).input(param(params, 'execId'), req.data, req.eof === true);
        return { status: 204 };
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/logs',
      handler: async ({ params, query, signal, res }) => {
        const following = boolQuery(query, 'follow');
        const tail = intQuery(query, 'tail');
        const since = intQuery(query, 'since');
        const filter = { ...(since !== undefined ? { sinceMs: since } : {}), execs: boolQuery(query, 'execs') };
        // A follower wakes an idle-paused instance (--idle-pause); one the user paused it waits for.
        const instance = m.instance(param(params, 'ref'));
        if (following) await instance.wake('logs --follow').catch(() => undefined);
        const { store, live } = instance.logs();
        const write = startStream(res);
        if (!following || !live) {
          for await (const e of store.read(tail, undefined, filter)) await write({ type: 'output', ...e });
          if (following) write({ type: 'end', ...endOf(instance.view()) });
          res.end();
          return STREAMED;
        }
        const end = await follow(store, write, signal, filter, tail);
        if (end) write({ type: 'end', ...end });
        res.end();
        return STREAMED;
      },
    },
  ];
}

/**
 * Streams a live instance's output from `tail` entries back (all by default) until its VM is
 * gone; resolves with how it ended, or undefined when the client went away first.
 */
export async function follow(
  store: LogStore,
  write: (ev: unknown) => Promise<void> | undefined,
  signal: AbortSignal,
  filter: LogFilter,
  tail?: number,
  /** Stop at the workload's exit rather than the VM's end. */
  untilExit = false,
): Promise<LogEnd | undefined> {
  // Subscribe first, then replay the file up to this instant: no gap, no duplicate.
  const pending: unknown[] = [];
  let replaying = true;
  const onEntry = (e: LogEntry): void => {
    if (!matches(e, filter)) return;
    const ev = { type: 'output', ...e };
    if (replaying) pending.push(ev);
    else write(ev);
  };
  let onEnd: ((end: LogEnd) => void) | undefined;
  const ended = new Promise<LogEnd>((resolve) => {
    const known = untilExit ? store.exitInfo : store.endInfo;
    // Known as soon as the guest said so, while its last output may still be on its way to
    // the file: resolved once the store has written it (and announced it to onEntry).
    if (known) return void store.settled().then(() => resolve(known));
    onEnd = resolve;
    store.on('end', onEnd);
    if (untilExit) store.on('exit', onEnd);
  });
  store.on('entry', onEntry);
  try {
    for await (const e of store.read(tail, store.sizes(), filter)) await write({ type: 'output', ...e });
    for (const ev of pending) write(ev);
    replaying = false;
    const gone = new Promise<undefined>((r) => signal.addEventListener('abort', () => r(undefined), { once: true }));
    return await Promise.race([ended, gone]);
  } finally {
    store.off('entry', onEntry);
    if (onEnd) store.off('end', onEnd).off('exit', onEnd);
  }
}

function endOf(row: InstanceView): LogEnd {
  return { state: row.state, exitCode: row.exitCode, ...(row.stateReason ? { stateReason: row.stateReason } : {}) };
}
