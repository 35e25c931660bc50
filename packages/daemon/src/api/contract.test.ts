/**
 * The daemon's answers checked against spec/openapi.json: every JSON body (and every NDJSON
 * event of the streams exercised) is validated with ajv against the response schema of the
 * operation that produced it, and every JSON operation of the spec must have been called.
 * The routes run on the real server with real row-to-view code (toView), a real registry and
 * secret store; only the instance lifecycle and the images behind them are stubbed.
 */
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import { Egress } from '../egress/egress.js';
import type { DaemonContext } from '../daemon.js';
import type { Logger } from '../log.js';
import { Registry, type InstanceRow } from '../registry/db.js';
import { SecretStore } from '../secrets/store.js';
import { toView, type ExecEvent } from '../instances/spec.js';
import { fileRoutes } from './routes/files.js';
import { imageRoutes } from './routes/images.js';
import { instanceRoutes } from './routes/instances.js';
import { secretRoutes } from './routes/secrets.js';
import { systemRoutes } from './routes/system.js';
import { eventRoutes } from './routes/events.js';
import { EventBus } from '../events/bus.js';
import { snapshotRoutes } from './routes/snapshots.js';
import { volumeRoutes } from './routes/volumes.js';
import { createServer } from './server.js';

interface Operation {
  method: string;
  path: string;
  operationId: string;
  responses: Record<string, { content?: Record<string, { schema: unknown }> }>;
}

const doc = JSON.parse(fs.readFileSync(new URL('../../../../spec/openapi.json', import.meta.url), 'utf8')) as {
  paths: Record<string, Record<string, Operation>>;
};
const METHODS = ['get', 'put', 'post', 'delete'];
const operations: Operation[] = Object.entries(doc.paths).flatMap(([p, ops]) =>
  Object.entries(ops)
    .filter(([method]) => METHODS.includes(method))
    .map(([method, op]) => ({ ...op, method: method.toUpperCase(), path: p })),
);

// The whole document as one schema, so that a response's $refs resolve where they point.
const ajv = new Ajv2020({ strict: false, validateFormats: false, allErrors: true });
ajv.addSchema(doc, 'openapi');
const pointer = (...parts: string[]): string => parts.map((p) => p.replaceAll('~', '~0').replaceAll('/', '~1')).join('/');

function operationOf(method: string, urlPath: string): Operation {
  const pathname = urlPath.split('?')[0] ?? '';
  const op = operations.find((o) => o.method === method && new RegExp(`^${o.path.replace(/\{\w+\}/g, '[^/]+')}$`).test(pathname));
  if (!op) throw new Error(`no operation in the spec for ${method} ${pathname}`);
  return op;
}

const validators = new Map<string, ValidateFunction>();
/** The validator of one response's body (`item`: of an NDJSON stream, each line is one). */
function responseSchema(op: Operation, status: number, mediaType: string): ValidateFunction {
  const key = op.responses[String(status)] ? String(status) : 'default';
  const content = op.responses[key]?.content?.[mediaType];
  if (!content) throw new Error(`${op.operationId} answers ${status} ${mediaType}, which its spec does not list`);
  const ref = `openapi#/${pointer('paths', op.path, op.method.toLowerCase(), 'responses', key, 'content', mediaType, 'schema')}`;
  let fn = validators.get(ref);
  if (!fn) {
    fn = ajv.compile({ $ref: ref });
    validators.set(ref, fn);
  }
  return fn;
}

// The spec's NDJSON responses are documented as `type: string`; their lines are these schemas.
const STREAM_EVENTS: Record<string, keyof ApiSchemas> = {
  execInstance: 'ExecEvent',
  getLogs: 'LogEvent',
  runInstance: 'RunEvent',
  pullImage: 'PullEvent',
  streamEvents: 'LifecycleEvent',
};

const NOW = Date.parse('2026-01-02T03:04:05.000Z');
const ROW: InstanceRow = {
  id: 'a1b2c3d4e5f6',
  handle: 'web',
  state: 'running',
  command: ['sleep', '600'],
  workdir: '/srv',
  memoryMiB: 512,
  vcpuCount: 2,
  backend: 'fake',
  vmRecord: null,
  exitCode: null,
  stateReason: null,
  createdAt: NOW,
  startedAt: NOW + 1,
  stoppedAt: null,
  ports: [{ guestPort: 80, hostPort: 8080, hostIp: '127.0.0.1', protocol: 'tcp' }],
  network: 'user',
  image: { reference: 'docker.io/library/alpine:3', digest: `sha256:${'ab'.repeat(32)}` },
  spec: { env: {}, secrets: [], user: 'app', labels: { team: 'a' }, deadlineAtMs: NOW + 60_000, idlePauseMs: 30_000 },
  volumes: [{ type: 'volume', source: 'cache', target: '/cache', readOnly: false }],
};
const STOPPED: InstanceRow = { ...ROW, state: 'stopped', exitCode: 0, stoppedAt: NOW + 2, stateReason: 'the workload exited' };
const IMAGE: ApiSchemas['Image'] = {
  digest: `sha256:${'ab'.repeat(32)}`,
  references: ['docker.io/library/alpine:3'],
  sizeBytes: 3_000_000,
  fsBytes: 8_000_000,
  storedAt: new Date(NOW).toISOString(),
  architecture: 'amd64',
};
const STAT = { name: 'a.txt', type: 'file', size: 3, mode: 0o644, uid: 0, gid: 0, mtimeMs: NOW } as const;
const VOLUME: ApiSchemas['Volume'] = {
  name: 'cache',
  sizeMiB: 1024,
  createdAt: new Date(NOW).toISOString(),
  allocatedBytes: 4096,
  usedBy: [],
};

/** A snapshot as the store reads it back (routes/snapshots.ts turns it into the API's view). */
const SNAPSHOT = {
  dir: '/snap/s1',
  state: '/snap/s1/state',
  disk: '/snap/s1/disk',
  meta: {
    format: 1,
    name: 's1',
    createdAt: NOW,
    auto: false,
    machine: {
      kernelPath: '/k',
      rootfsPath: '/r',
      memoryMiB: 512,
      vcpuCount: 1,
      scratchDiskMiB: 4096,
      network: 'none',
      kernelArgs: [],
      volumes: [],
      ramInFile: false,
      backend: 'qemu',
      vmmVersion: 'QEMU 7.2',
      acceleration: 'tcg',
    },
    instance: {
      id: ROW.id,
      handle: ROW.handle,
      command: ROW.command,
      workdir: null,
      network: 'user',
      image: ROW.image,
      env: {},
      secrets: [],
      labels: { team: 'a' },
      guestPorts: [80],
      volumes: [],
      identityOf: ROW.id,
    },
    stateBytes: 120_000_000,
    diskBytes: 4 << 30,
    diskAllocatedBytes: 2 << 20,
    stateSha256: 'ab'.repeat(32),
  },
};

/** Each NDJSON line of a response, parsed. */
const lines = (text: string): unknown[] =>
  text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as unknown);

describe('every answer of the daemon matches spec/openapi.json', () => {
  let dir: string;
  let socketPath: string;
  let server: http.Server;
  let registry: Registry;
  const called = new Set<string>();
  let failures: string[] = [];

  const egress = new Egress({ allow: [], deny: ['evil.example'] });
  void egress.connect({ address: '169.254.169.254', port: 80 });
  /** One instance's owner, as the routes reach it through `instances.instance(ref)`. */
  const instance = {
    view: () => toView(STOPPED),
    delete: () => Promise.resolve(),
    stop: () => Promise.resolve(toView(STOPPED)),
    pause: () => Promise.resolve(toView({ ...ROW, state: 'paused' })),
    resume: () => Promise.resolve(toView(ROW)),
    restart: () => Promise.resolve(toView(ROW)),
    wait: () => Promise.resolve({ state: 'stopped', exitCode: 0 }),
    extend: () => toView(ROW),
    stats: () =>
      Promise.resolve({
        id: ROW.id,
        handle: ROW.handle,
        state: ROW.state,
        cpuPercent: 12.5,
        vmmMemoryBytes: 100_000_000,
        memoryLimitBytes: 512 << 20,
        guestMemoryUsedBytes: 50_000_000,
        guestMemoryTotalBytes: 500_000_000,
        processes: 5,
        diskUsedBytes: 1 << 20,
      }),
    // A real policy's view, with a decision in its log.
    egress: (log: boolean) => ({ network: 'user' as const, ...egress.view(log) }),
    updateEgress: (change: { allow?: string[]; deny?: string[] }) => {
      egress.update(change);
      return { network: 'user' as const, ...egress.view(false) };
    },
    top: () =>
      Promise.resolve({
        processes: [{ pid: 7, ppid: 1, uid: 0, state: 'S', rssKiB: 900, cpuMs: 10, startedAfterBootMs: 400, command: 'sleep 600' }],
      }),
    exec: async (_req: unknown, emit: (ev: ExecEvent) => void | Promise<void>) => {
      await emit({ type: 'started', execId: 'e1' });
      await emit({ type: 'output', stream: 'stdout', data: 'aGk=' });
      await emit({ type: 'exit', exitCode: 0, signal: null, guestDurationMs: 3, truncated: true });
    },
    checkpoint: () => Promise.resolve(SNAPSHOT),
    hibernate: () => Promise.resolve(toView({ ...ROW, state: 'hibernated', vmRecord: null })),
    input: () => Promise.resolve(),
    resize: () => Promise.resolve(),
    signal: () => Promise.resolve(),
    wake: () => Promise.resolve(),
    abandon: () => undefined,
    removed: Promise.resolve(),
    holdAwake: () => () => undefined,
    // A store whose instance has ended: logs replays it, run reads it and reports the end.
    logs: () => ({
      live: false,
      store: {
        exitInfo: { state: 'stopped', exitCode: 0 },
        async *read() {
          yield await Promise.resolve({ timeMs: NOW, stream: 'stdout', data: 'aGk=' });
          yield { timeMs: NOW, stream: 'stderr', data: '', execId: 'e1' };
        },
      },
    }),
    files: (req: { op: string }) => {
      const data = Readable.from(req.op === 'list' ? [`${JSON.stringify(STAT)}\n`] : []);
      return Promise.resolve(req.op === 'remove' ? { data } : { stat: STAT, data });
    },
  };
  const instances = {
    counts: () => ({ total: 1, running: 1 }),
    poolStatus: () => undefined,
    list: () => [toView(ROW), toView(STOPPED)],
    create: () => Promise.resolve(toView({ ...ROW, state: 'running' })),
    get: () => toView(STOPPED),
    instance: () => instance,
    userOfImage: () => undefined,
    snapshots: { list: () => Promise.resolve([SNAPSHOT]), get: () => Promise.resolve(SNAPSHOT) },
    snapshotDependents: () => ['web2'],
    deleteSnapshot: () => Promise.resolve(),
    deleteInstance: () => Promise.resolve(),
    fork: () => Promise.resolve({ snapshot: 'web-fork-1', instances: [toView({ ...ROW, state: 'running' })] }),
    volumes: {
      list: () => Promise.resolve([VOLUME]),
      create: () => Promise.resolve({ volume: VOLUME, created: true }),
      get: () => Promise.resolve(VOLUME),
      remove: () => Promise.resolve(),
    },
  };
  const images = {
    list: () => [IMAGE],
    get: () => IMAGE,
    remove: () => Promise.resolve({ untagged: ['docker.io/library/alpine:3'], deleted: IMAGE.digest }),
    import: () => Promise.resolve([IMAGE]),
    pull: (reference: string, progress: (ev: unknown) => void) => {
      if (reference === 'fails') throw new AegisError('NOT_FOUND', 'no such image');
      progress({ type: 'resolved', reference: 'docker.io/library/alpine:3' });
      if (reference === 'fails-late') throw new AegisError('UNAVAILABLE', 'the registry went away');
      progress({ type: 'progress', digest: IMAGE.digest, phase: 'layer', doneBytes: 1, totalBytes: 2 });
      progress({ type: 'preparing', digest: IMAGE.digest });
      progress({ type: 'done', image: IMAGE, cached: false });
      return Promise.resolve();
    },
  };

  beforeAll(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-contract-test-'));
    socketPath = path.join(dir, 'api.sock');
    registry = new Registry(path.join(dir, 'aegis.db'));
    // A real bus over the test's registry, with one event of each shape.
    const events = new EventBus(registry);
    events.publish({ type: 'create', instanceId: ROW.id, handle: 'web', state: 'starting', labels: { team: 'a' } });
    events.publish({
      type: 'stop',
      instanceId: ROW.id,
      handle: 'web',
      state: 'stopped',
      previousState: 'stopping',
      exitCode: null,
      reason: 'r',
    });
    events.publish({ type: 'fork', instanceId: ROW.id, handle: 'web', snapshot: 'web-fork-1', forks: ['web-fork-a'] });
    events.denied({ type: 'egress-denied', instanceId: ROW.id, handle: 'web', destination: '169.254.169.254:80', reason: 'link-local' });
    const ctx = {
      version: 'test',
      config: { home: dir },
      backend: { name: 'fake' },
      probe: { detail: 'fake 1.0', capabilities: { acceleration: 'tcg' }, accelerationReason: 'no /dev/kvm' },
      instances,
      secrets: new SecretStore(registry, path.join(dir, 'secrets.key')),
      images,
      loopDelay: { read: () => ({ p50Ms: 0.1, p99Ms: 1, maxMs: 2, windowMs: 10_000 }) },
      shutdown: () => Promise.resolve(),
    } as unknown as DaemonContext;
    const logger: Logger = { info() {}, warn() {} };
    server = createServer(
      [
        ...systemRoutes(ctx),
        ...instanceRoutes(ctx),
        ...fileRoutes(ctx),
        ...secretRoutes(ctx),
        ...imageRoutes(ctx),
        ...volumeRoutes(ctx),
        ...snapshotRoutes(ctx),
        ...eventRoutes(ctx.instances, events),
      ],
      logger,
    );
    await new Promise<void>((resolve) => server.listen(socketPath, () => resolve()));
  });

  beforeEach(() => {
    failures = [];
  });

  afterAll(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    registry.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  /** Sends a request and checks what comes back against the spec; returns the status. */
  function call(method: string, urlPath: string, body?: unknown): Promise<number> {
    const op = operationOf(method, urlPath);
    return new Promise((resolve, reject) => {
      const req = http.request({ socketPath, path: urlPath, method, agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const status = res.statusCode ?? 0;
          const type = String(res.headers['content-type'] ?? '');
          const text = Buffer.concat(chunks).toString('utf8');
          const what = `${method} ${urlPath} → ${status}`;
          try {
            if (type === 'application/json') {
              const fn = responseSchema(op, status, type);
              if (!fn(JSON.parse(text))) failures.push(`${what}: ${ajv.errorsText(fn.errors)} in ${text.slice(0, 300)}`);
            } else if (type === 'application/x-ndjson') {
              responseSchema(op, status, type);
              const event = STREAM_EVENTS[op.operationId];
              if (!event) throw new Error(`no event schema for the stream of ${op.operationId}`);
              const fn = ajv.getSchema(`openapi#/${pointer('components', 'schemas', event)}`);
              for (const ev of lines(text)) {
                if (!fn?.(ev)) failures.push(`${what}: ${ajv.errorsText(fn?.errors)} in ${JSON.stringify(ev).slice(0, 300)}`);
              }
            } else if (text !== '' || !op.responses[String(status)]) {
              failures.push(`${what}: ${type || 'no body'}, which the spec does not list`);
            }
            if (status < 400) called.add(op.operationId);
            resolve(status);
          } catch (err) {
            reject(err as Error);
          }
        });
      });
      req.on('error', reject);
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  }

  it('answers each JSON operation with a body its response schema accepts, and each stream event with its event schema', async () => {
    const ok = async (method: string, urlPath: string, body?: unknown): Promise<void> => {
      expect(await call(method, urlPath, body), `${method} ${urlPath}`).toBeLessThan(300);
    };
    await ok('GET', '/v1/status');
    await ok('GET', '/v1/instances?all=true');
    await ok('POST', '/v1/instances', { command: ['sleep', '600'] });
    await ok('GET', '/v1/instances/web');
    await ok('POST', '/v1/instances/web/stop', { timeoutMs: 1000 });
    await ok('POST', '/v1/instances/web/pause');
    await ok('POST', '/v1/instances/web/resume');
    await ok('POST', '/v1/instances/web/hibernate');
    await ok('POST', '/v1/instances/web/restart');
    await ok('POST', '/v1/instances/web/wait');
    await ok('POST', '/v1/instances/web/deadline', { timeoutMs: 60_000 });
    await ok('GET', '/v1/instances/web/stats');
    await ok('GET', '/v1/instances/web/top');
    await ok('GET', '/v1/instances/web/egress?log=1');
    await ok('POST', '/v1/instances/web/egress', { allow: ['pypi.org', '*.pythonhosted.org:443'] });
    await ok('POST', '/v1/instances/web/exec', { command: ['echo', 'hi'] });
    await ok('POST', '/v1/instances/web/input', { data: 'aGk=' });
    await ok('POST', '/v1/instances/web/resize', { rows: 24, cols: 80 });
    await ok('POST', '/v1/instances/web/signal', { signal: 'SIGTERM' });
    await ok('POST', '/v1/instances/web/execs/e1/signal', { signal: 'SIGTERM' });
    await ok('POST', '/v1/instances/web/execs/e1/input', { eof: true });
    await ok('POST', '/v1/instances/web/execs/e1/resize', { rows: 24, cols: 80 });
    await ok('GET', '/v1/instances/web/logs?execs=true');
    await ok('GET', '/v1/instances/web/logs?follow=true');
    await ok('POST', '/v1/run', { command: ['echo', 'hi'], autoRemove: true });
    await ok('GET', '/v1/instances/web/files/stat?path=/a.txt');
    await ok('GET', '/v1/instances/web/files/list?path=/');
    await ok('POST', '/v1/instances/web/files/mkdir', { path: '/d', parents: true });
    await ok('PUT', '/v1/instances/web/files?path=/a.txt');
    await ok('PUT', '/v1/instances/web/archive?path=/');
    await ok('DELETE', '/v1/instances/web/files?path=/a.txt');
    await ok('DELETE', '/v1/instances/web');
    await ok('PUT', '/v1/secrets/TOKEN', { value: 'v' });
    await ok('GET', '/v1/secrets');
    await ok('DELETE', '/v1/secrets/TOKEN');
    await ok('GET', '/v1/images');
    await ok('GET', '/v1/images/alpine:3');
    await ok('POST', '/v1/images/pull', { reference: 'alpine:3' });
    await ok('POST', '/v1/images/import', { path: '/tmp/alpine.tar' });
    await ok('DELETE', '/v1/images/alpine:3');
    await ok('GET', '/v1/volumes');
    await ok('POST', '/v1/volumes', { name: 'cache' });
    await ok('POST', '/v1/instances/web/snapshots', { name: 's1' });
    await ok('POST', '/v1/instances/web/fork', { count: 1, timeoutMs: 60_000, autoRemove: true });
    await ok('GET', '/v1/snapshots');
    await ok('GET', '/v1/snapshots/s1');
    await ok('DELETE', '/v1/snapshots/s1');
    await ok('GET', '/v1/events?since=0&type=create&type=stop&type=fork&type=egress-denied&label=team');
    await ok('GET', '/v1/events?after=1');
    await ok('GET', '/v1/volumes/cache');
    await ok('DELETE', '/v1/volumes/cache');
    expect(failures).toEqual([]);

    // Every operation answering JSON (or NDJSON) was called; the byte streams and shutdown are not JSON.
    const json = operations.filter((o) =>
      Object.entries(o.responses).some(
        ([status, r]) => status !== 'default' && (r.content?.['application/json'] ?? r.content?.['application/x-ndjson']),
      ),
    );
    expect(json.map((o) => o.operationId).filter((id) => !called.has(id))).toEqual([]);
  });

  it('answers errors, before and during a stream, with the Error schema or an error event', async () => {
    expect(await call('POST', '/v1/instances', { command: [] })).toBe(400);
    expect(await call('PUT', '/v1/secrets/TOKEN', { value: 1 })).toBe(400);
    expect(await call('GET', '/v1/instances/web/files/stat?path=relative')).toBe(400);
    expect(await call('POST', '/v1/images/pull', { reference: 'fails' })).toBe(404);
    expect(await call('POST', '/v1/images/pull', { reference: 'fails-late' })).toBe(200);
    expect(failures).toEqual([]);
  });
});
