import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { EventBus, type LifecycleEvent } from '../../events/bus.js';
import type { InstanceManager } from '../../instances/manager.js';
import { Registry } from '../../registry/db.js';
import { createServer } from '../server.js';
import { eventRoutes } from './events.js';

let dir: string;
let registry: Registry;
let bus: EventBus;
let server: http.Server;
let sock: string;

/** No live instances: an instance filter matches references as given. */
const manager = {
  instance: () => {
    throw new Error('not found');
  },
} as unknown as InstanceManager;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-events-route-'));
  registry = new Registry(path.join(dir, 'aegis.db'));
  bus = new EventBus(registry);
  server = createServer(eventRoutes(manager, bus), { info() {}, warn() {} });
  sock = path.join(dir, 'api.sock');
  await new Promise<void>((r) => server.listen(sock, () => r()));
});

afterEach(async () => {
  server.closeAllConnections();
  await new Promise<void>((r) => server.close(() => r()));
  registry.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

const exit = (n: number, handle = 'a'): void => void bus.publish({ type: 'exit', instanceId: `id-${handle}`, handle, exitCode: n });

describe('GET /v1/events', () => {
  it('a follower from `since` gets the stored events, then those published while it read them, then live ones: each once, in order', async () => {
    for (let i = 0; i < 1200; i++) exit(i); // more than one page of history
    const got: LifecycleEvent[] = [];
    const stop = new AbortController();
    const following = (async () => {
      try {
        for await (const ev of events({ sinceMs: 0, follow: true, signal: stop.signal })) {
          got.push(ev);
          // Published while the history is still being sent.
          if (got.length === 10) for (let i = 1200; i < 1300; i++) exit(i);
          if (got.length === 1300) exit(1300);
          if (got.length === 1301) stop.abort();
        }
      } catch {
        // aborted
      }
    })();
    await following;
    expect(got.map((e) => e.exitCode)).toEqual(Array.from({ length: 1301 }, (_, i) => i));
    expect(got.map((e) => e.seq)).toEqual(got.map((_, i) => (got[0]?.seq ?? 0) + i));
  });

  it('without follow: the stored events from `since` (or after a sequence number) and the stream ends; filters apply', async () => {
    exit(1, 'a');
    exit(2, 'b');
    bus.publish({ type: 'delete', instanceId: 'id-b', handle: 'b' });
    const all = await collect(events({ sinceMs: 0 }));
    expect(all.map((e) => `${e.type} ${e.handle}`)).toEqual(['exit a', 'exit b', 'delete b']);
    expect((await collect(events({ afterSeq: all[0]?.seq ?? 0 }))).length).toBe(2);
    expect((await collect(events({ sinceMs: 0, instances: ['b'], types: ['exit'] }))).map((e) => e.exitCode)).toEqual([2]);
    expect(await collect(events({}))).toEqual([]);
    expect(await collect(events({ sinceMs: Date.now() + 60_000 }))).toEqual([]);
  });

  it('a follow with `until` ends at that time', async () => {
    const t0 = Date.now();
    const got = await collect(events({ follow: true, untilMs: t0 + 400 }));
    expect(got).toEqual([]);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(390);
    expect(Date.now() - t0).toBeLessThan(3000);
  });

  it('refuses an unknown type, an oversized filter and until before since with INVALID_ARGUMENT', async () => {
    for (const opts of [{ types: ['exploded'] }, { labels: ['x'.repeat(300)] }, { sinceMs: 2000, untilMs: 1000 }]) {
      await expect(collect(events(opts))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
  });
});

interface Query {
  sinceMs?: number;
  untilMs?: number;
  afterSeq?: number;
  follow?: boolean;
  types?: string[];
  instances?: string[];
  labels?: string[];
  signal?: AbortSignal;
}

/** The route's NDJSON read line by line (the daemon's tests may not use @aegis/client); an error answer or line thrown. */
async function* events(q: Query): AsyncGenerator<LifecycleEvent> {
  const p = new URLSearchParams();
  if (q.sinceMs !== undefined) p.set('since', String(q.sinceMs));
  if (q.untilMs !== undefined) p.set('until', String(q.untilMs));
  if (q.afterSeq !== undefined) p.set('after', String(q.afterSeq));
  if (q.follow) p.set('follow', 'true');
  for (const t of q.types ?? []) p.append('type', t);
  for (const i of q.instances ?? []) p.append('instance', i);
  for (const l of q.labels ?? []) p.append('label', l);
  const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
    const req = http.get({ socketPath: sock, path: `/v1/events?${p.toString()}`, ...(q.signal ? { signal: q.signal } : {}) }, resolve);
    req.on('error', reject);
  });
  let buf = '';
  for await (const chunk of res as AsyncIterable<Buffer>) {
    buf += chunk.toString('utf8');
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = JSON.parse(buf.slice(0, nl)) as LifecycleEvent | { type: 'error'; code: string; message: string };
      buf = buf.slice(nl + 1);
      if (line.type === 'error') throw AegisError.fromWire(line);
      yield line as LifecycleEvent;
    }
  }
  if (res.statusCode !== 200) throw AegisError.fromWire(JSON.parse(buf));
}

async function collect<T>(it: AsyncIterable<T>): Promise<T[]> {
  const out: T[] = [];
  for await (const x of it) out.push(x);
  return out;
}
