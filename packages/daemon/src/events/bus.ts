/**
 * Lifecycle events (`aegis events`, `GET /v1/events`): each change the instances' owners make
 * is published here once, stored in the registry (a bounded history that outlives the daemon)
 * and handed to every live subscriber in order. A subscriber that joins with `since` reads the
 * stored history first and then the live ones, with nothing lost or repeated between the two
 * (sequence numbers decide).
 *
 * Events come from the instances' single owners (instances/owner.ts: a state change is one
 * compare-and-set, and its event is published right after it), so their order per instance is
 * the order of the changes. The guest can make events happen (its workload exits, it asks for
 * refused destinations) but never writes one: refusals are reported at a bounded rate.
 */
import { EventEmitter } from 'node:events';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { Registry } from '../registry/db.js';

export type LifecycleEvent = ApiSchemas['LifecycleEvent'];
export type EventType = LifecycleEvent['type'];
/** What a publisher gives: the bus numbers and dates it. */
export type NewEvent = Omit<LifecycleEvent, 'seq' | 'timeMs'>;

export interface EventFilter {
  types?: readonly string[];
  /** Handles or ids (an id prefix is not resolved here: the route resolves live references). */
  instances?: readonly string[];
  /** `k` or `k=v`. */
  labels?: readonly string[];
}

/** How many events the history keeps (the oldest go first). */
export const EVENTS_KEPT = 10_000;
/** Pruned once per this many events, not on each. */
const PRUNE_EVERY = 256;
/** Egress refusals reported per instance per second; the rest are counted into the next one. */
const DENIALS_PER_SECOND = 5;

export function matches(ev: LifecycleEvent, f: EventFilter): boolean {
  if (f.types?.length && !f.types.includes(ev.type)) return false;
  if (f.instances?.length && !f.instances.some((r) => r === ev.handle || r === ev.instanceId)) return false;
  for (const l of f.labels ?? []) {
    const eq = l.indexOf('=');
    const key = eq < 0 ? l : l.slice(0, eq);
    const value = ev.labels?.[key];
    if (value === undefined || (eq >= 0 && value !== l.slice(eq + 1))) return false;
  }
  return true;
}

export class EventBus {
  private readonly emitter = new EventEmitter();
  private sincePrune = 0;
  private readonly denials = new Map<string, { windowStart: number; inWindow: number; suppressed: number }>();

  constructor(
    private readonly registry: Registry,
    private readonly keep = EVENTS_KEPT,
  ) {
    // Every follower is a listener; there is no fixed number of them.
    this.emitter.setMaxListeners(0);
  }

  publish(e: NewEvent): LifecycleEvent {
    const timeMs = Date.now();
    const body = JSON.stringify({ timeMs, ...e });
    const seq = this.registry.insertEvent(timeMs, e.type, e.instanceId, body);
    const ev: LifecycleEvent = { seq, timeMs, ...e };
    if (++this.sincePrune >= PRUNE_EVERY) {
      this.sincePrune = 0;
      this.registry.pruneEvents(this.keep);
    }
    this.emitter.emit('event', ev);
    return ev;
  }

  /**
   * An egress refusal: published when the instance is under its rate, otherwise counted and
   * carried by the next one published (`suppressed`), so a guest hammering a refused address
   * cannot flood the history.
   */
  denied(e: NewEvent & { instanceId: string }): void {
    const now = Date.now();
    let d = this.denials.get(e.instanceId);
    if (!d || now - d.windowStart >= 1000) {
      d = { windowStart: now, inWindow: 0, suppressed: d?.suppressed ?? 0 };
      this.denials.set(e.instanceId, d);
    }
    if (d.inWindow >= DENIALS_PER_SECOND) {
      d.suppressed++;
      return;
    }
    d.inWindow++;
    const suppressed = d.suppressed;
    d.suppressed = 0;
    this.publish({ ...e, type: 'egress-denied', ...(suppressed > 0 ? { suppressed } : {}) });
  }

  /** Forgets an instance's refusal counts (it is gone). */
  forget(instanceId: string): void {
    this.denials.delete(instanceId);
  }

  /** Stored events after `afterSeq` from `sinceMs`, oldest first, in pages. */
  *history(afterSeq: number, sinceMs: number, pageSize = 500): Generator<LifecycleEvent> {
    let after = afterSeq;
    for (;;) {
      const page = this.registry.listEvents(after, sinceMs, pageSize);
      for (const { seq, event } of page) {
        after = seq;
        yield { seq, ...(JSON.parse(event) as Omit<LifecycleEvent, 'seq'>) };
      }
      if (page.length < pageSize) return;
    }
  }

  /** Calls `fn` with every event published from now on; returns the function that stops it. */
  subscribe(fn: (ev: LifecycleEvent) => void): () => void {
    this.emitter.on('event', fn);
    return () => this.emitter.off('event', fn);
  }
}
