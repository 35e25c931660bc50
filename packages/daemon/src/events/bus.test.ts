import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { Registry } from '../registry/db.js';
import { EventBus, matches, type LifecycleEvent } from './bus.js';

let dir: string;
let registry: Registry;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-events-'));
  registry = new Registry(path.join(dir, 'aegis.db'));
});

afterEach(() => {
  registry.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('EventBus', () => {
  it('numbers events in order, hands them to subscribers, and keeps them for a new daemon', () => {
    const bus = new EventBus(registry);
    const seen: LifecycleEvent[] = [];
    const stop = bus.subscribe((e) => seen.push(e));
    const a = bus.publish({ type: 'create', instanceId: 'i1', handle: 'web', state: 'starting', labels: { team: 'a' } });
    const b = bus.publish({ type: 'start', instanceId: 'i1', handle: 'web', state: 'running', previousState: 'starting' });
    stop();
    bus.publish({ type: 'stop', instanceId: 'i1', handle: 'web', state: 'stopped', exitCode: 0 });
    expect(b.seq).toBe(a.seq + 1);
    expect(seen.map((e) => e.type)).toEqual(['create', 'start']);
    registry.close();
    registry = new Registry(path.join(dir, 'aegis.db'));
    const again = [...new EventBus(registry).history(0, 0)];
    expect(again.map((e) => [e.seq, e.type])).toEqual([
      [a.seq, 'create'],
      [b.seq, 'start'],
      [b.seq + 1, 'stop'],
    ]);
    expect(again[0]).toEqual(a);
    expect([...new EventBus(registry).history(a.seq, 0)].map((e) => e.type)).toEqual(['start', 'stop']);
    expect([...new EventBus(registry).history(0, Date.now() + 60_000)]).toEqual([]);
  });

  it('keeps a bounded history, the newest', () => {
    const bus = new EventBus(registry, 100);
    for (let i = 0; i < 1000; i++) bus.publish({ type: 'exit', instanceId: 'i1', handle: 'h', exitCode: i });
    const kept = [...bus.history(0, 0)];
    expect(kept.length).toBeLessThanOrEqual(100 + 256);
    expect(kept.at(-1)?.exitCode).toBe(999);
    expect(kept.map((e) => e.exitCode)).toEqual(kept.map((_, i) => 1000 - kept.length + i));
  });

  it('reports a flood of egress refusals at a bounded rate, counting the rest into the next one', async () => {
    const bus = new EventBus(registry);
    for (let i = 0; i < 100; i++)
      bus.denied({ type: 'egress-denied', instanceId: 'i1', handle: 'h', destination: '10.0.0.1:80', reason: 'private' });
    bus.denied({ type: 'egress-denied', instanceId: 'i2', handle: 'other', destination: '10.0.0.1:80', reason: 'private' });
    expect([...bus.history(0, 0)].filter((e) => e.instanceId === 'i1')).toHaveLength(5);
    expect([...bus.history(0, 0)].filter((e) => e.instanceId === 'i2')).toHaveLength(1);
    await new Promise((r) => setTimeout(r, 1050));
    bus.denied({ type: 'egress-denied', instanceId: 'i1', handle: 'h', destination: '10.0.0.1:80', reason: 'private' });
    expect([...bus.history(0, 0)].at(-1)?.suppressed).toBe(95);
  });
});

describe('matches', () => {
  const ev: LifecycleEvent = { seq: 1, timeMs: 0, type: 'start', instanceId: 'abc123', handle: 'web', labels: { team: 'a', tier: '' } };
  it('combines type, instance and label filters; each kind matches any of its values', () => {
    expect(matches(ev, {})).toBe(true);
    expect(matches(ev, { types: ['stop', 'start'] })).toBe(true);
    expect(matches(ev, { types: ['stop'] })).toBe(false);
    expect(matches(ev, { instances: ['web'] })).toBe(true);
    expect(matches(ev, { instances: ['abc123'] })).toBe(true);
    expect(matches(ev, { instances: ['db'] })).toBe(false);
    expect(matches(ev, { labels: ['team'] })).toBe(true);
    expect(matches(ev, { labels: ['team=a', 'tier='] })).toBe(true);
    expect(matches(ev, { labels: ['team=b'] })).toBe(false);
    expect(matches({ ...ev, labels: undefined } as unknown as LifecycleEvent, { labels: ['team'] })).toBe(false);
  });
});
