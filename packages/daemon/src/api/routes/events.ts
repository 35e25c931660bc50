import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import { matches, type EventBus, type EventFilter, type LifecycleEvent } from '../../events/bus.js';
import { boolQuery, intQuery, startStream, STREAMED, type Route } from '../server.js';
import type { InstanceManager } from '../../instances/manager.js';

const TYPES: readonly string[] = [
  'create',
  'start',
  'exit',
  'stop',
  'fail',
  'pause',
  'resume',
  'hibernate',
  'restore',
  'snapshot',
  'fork',
  'delete',
  'deadline',
  'egress-denied',
] satisfies readonly ApiSchemas['LifecycleEvent']['type'][];

/** Events waiting for a slow follower before it is cut off. */
const MAX_HELD = 10_000;

/** At most this many values per filter kind: a filter is a short list, not a payload. */
const MAX_FILTER_VALUES = 64;

function filterOf(query: URLSearchParams, m: InstanceManager): EventFilter {
  const list = (name: string): string[] => {
    const values = query.getAll(name);
    if (values.length > MAX_FILTER_VALUES) throw new AegisError('INVALID_ARGUMENT', `at most ${MAX_FILTER_VALUES} ${name} filters`);
    if (values.some((v) => v === '' || v.length > 256))
      throw new AegisError('INVALID_ARGUMENT', `a ${name} filter must be 1-256 characters`);
    return values;
  };
  const types = list('type');
  const unknown = types.find((t) => !TYPES.includes(t));
  if (unknown) throw new AegisError('INVALID_ARGUMENT', `unknown event type "${unknown}"; types: ${TYPES.join(', ')}`);
  // A live instance's handle and id both match (an id prefix is resolved); a deleted one's events
  // match the reference as given.
  const instances = list('instance').flatMap((ref) => {
    try {
      const v = m.instance(ref).view();
      return [v.id, v.handle];
    } catch {
      return [ref];
    }
  });
  return { types, instances, labels: list('label') };
}

export function eventRoutes(m: InstanceManager, bus: EventBus): Route[] {
  return [
    {
      method: 'GET',
      path: '/v1/events',
      handler: async ({ query, signal, res }) => {
        const filter = filterOf(query, m);
        const since = intQuery(query, 'since');
        const until = intQuery(query, 'until');
        const after = intQuery(query, 'after') ?? 0;
        const follow = boolQuery(query, 'follow');
        if (since !== undefined && until !== undefined && until < since) {
          throw new AegisError('INVALID_ARGUMENT', 'until is before since');
        }
        const write = startStream(res);
        // Subscribed before the history is read: what happens meanwhile is held, then sent
        // after it, each event once (by sequence number).
        const held: LifecycleEvent[] = [];
        let wake: (() => void) | undefined;
        const unsubscribe = follow
          ? bus.subscribe((ev) => {
              if (held.length >= MAX_HELD) {
                // A follower that cannot keep up is cut off, saying so, rather than held without bound.
                if (!res.writableEnded) {
                  res.end(
                    JSON.stringify({
                      type: 'error',
                      code: 'RESOURCE_EXHAUSTED',
                      message: 'the client read events too slowly; stream ended',
                    }) + '\n',
                  );
                }
                wake?.();
                return;
              }
              held.push(ev);
              wake?.();
            })
          : undefined;
        let last = after;
        const send = async (ev: LifecycleEvent): Promise<boolean> => {
          if (ev.seq <= last) return true;
          last = ev.seq;
          if (until !== undefined && ev.timeMs > until) return false;
          if (matches(ev, filter)) await write(ev);
          return !res.destroyed && !res.writableEnded;
        };
        try {
          let open = true;
          // Without `since` or `after`, a follower starts from now (as docker events does).
          if (since !== undefined || after > 0) {
            for (const ev of bus.history(after, since ?? 0)) {
              if (!(open = await send(ev))) break;
            }
          }
          // One listener for the whole follow (not one per wait): a long follower adds none.
          const onAbort = (): void => wake?.();
          signal.addEventListener('abort', onAbort, { once: true });
          const untilTimer = until !== undefined && follow ? setTimeout(() => wake?.(), Math.max(0, until - Date.now()) + 1) : undefined;
          try {
            while (open && follow && !signal.aborted && (until === undefined || Date.now() <= until)) {
              const ev = held.shift();
              if (ev) {
                open = await send(ev);
                continue;
              }
              await new Promise<void>((resolve) => (wake = resolve));
              wake = undefined;
            }
          } finally {
            clearTimeout(untilTimer);
            signal.removeEventListener('abort', onAbort);
          }
        } finally {
          unsubscribe?.();
        }
        if (!res.writableEnded) res.end();
        return STREAMED;
      },
    },
  ];
}
