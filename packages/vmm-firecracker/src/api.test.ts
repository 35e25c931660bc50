import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { FirecrackerApi } from './api.js';

interface Seen {
  method: string;
  path: string;
  contentType: string | undefined;
  body: unknown;
}

/** Answers like Firecracker's API server: 204 for accepted configuration, a JSON fault otherwise. */
class StubApi {
  readonly seen: Seen[] = [];
  /** `METHOD /path` → [status, raw body]. Unlisted requests get 204. */
  readonly answers = new Map<string, [number, string]>();
  hang = false;
  private readonly server = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      this.seen.push({
        method: req.method ?? '',
        path: req.url ?? '',
        contentType: req.headers['content-type'],
        body: text ? (JSON.parse(text) as unknown) : undefined,
      });
      if (this.hang) return;
      const answer = this.answers.get(`${req.method} ${req.url}`);
      if (!answer) return void res.writeHead(204).end();
      res.writeHead(answer[0], { 'Content-Type': 'application/json' }).end(answer[1]);
    });
  });

  constructor(readonly socketPath: string) {}

  listen(): Promise<void> {
    return new Promise((resolve) => this.server.listen(this.socketPath, resolve));
  }

  close(): Promise<void> {
    this.server.closeAllConnections();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

let dir: string;
let stub: StubApi;
let api: FirecrackerApi;

beforeEach(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-fcapi-'));
  stub = new StubApi(path.join(dir, 'fc.sock'));
  await stub.listen();
  api = new FirecrackerApi(stub.socketPath);
});

afterEach(async () => {
  await stub.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

async function failure(p: Promise<unknown>): Promise<AegisError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(AegisError);
  return err as AegisError;
}

describe('FirecrackerApi', () => {
  it('sends PUT and PATCH bodies as JSON and resolves undefined on 204', async () => {
    await expect(api.put('/machine-config', { vcpu_count: 2, mem_size_mib: 256, smt: false })).resolves.toBeUndefined();
    await expect(api.patch('/vm', { state: 'Paused' })).resolves.toBeUndefined();
    expect(stub.seen).toEqual([
      { method: 'PUT', path: '/machine-config', contentType: 'application/json', body: { vcpu_count: 2, mem_size_mib: 256, smt: false } },
      { method: 'PATCH', path: '/vm', contentType: 'application/json', body: { state: 'Paused' } },
    ]);
  });

  it('returns the parsed JSON of a GET', async () => {
    stub.answers.set('GET /', [200, '{"id":"vm1","state":"Running","vmm_version":"1.10.1","app_name":"Firecracker"}']);
    await expect(api.get('/')).resolves.toEqual({ id: 'vm1', state: 'Running', vmm_version: '1.10.1', app_name: 'Firecracker' });
    expect(stub.seen[0]?.body).toBeUndefined();
  });

  it('turns a 400 fault_message into INVALID_ARGUMENT carrying the message', async () => {
    stub.answers.set('PUT /drives/scratch', [400, '{"fault_message":"Unable to open the block device backing file."}']);
    const err = await failure(api.put('/drives/scratch', { drive_id: 'scratch' }));
    expect(err.code).toBe('INVALID_ARGUMENT');
    expect(err.message).toBe('Firecracker PUT /drives/scratch: Unable to open the block device backing file.');
  });

  it('turns any other failure status into UNAVAILABLE, with the body when it is not a fault', async () => {
    stub.answers.set('PUT /snapshot/create', [500, '{"fault_message":"Cannot write memory file"}']);
    stub.answers.set('PUT /actions', [503, 'busy']);
    const a = await failure(api.put('/snapshot/create', {}));
    expect([a.code, a.message]).toEqual(['UNAVAILABLE', 'Firecracker PUT /snapshot/create: Cannot write memory file']);
    const b = await failure(api.put('/actions', { action_type: 'InstanceStart' }));
    expect([b.code, b.message]).toEqual(['UNAVAILABLE', 'Firecracker PUT /actions: status 503: busy']);
  });

  it('fails with UNAVAILABLE when nothing listens on the socket', async () => {
    const err = await failure(new FirecrackerApi(path.join(dir, 'absent.sock')).get('/'));
    expect(err.code).toBe('UNAVAILABLE');
  });

  it('fails with UNAVAILABLE when Firecracker does not answer in time', async () => {
    stub.hang = true;
    const err = await failure(api.put('/actions', { action_type: 'InstanceStart' }, { timeoutMs: 100 }));
    expect(err.code).toBe('UNAVAILABLE');
    expect(err.message).toContain('no answer within 100 ms');
  });

  it('fails with CANCELLED when the signal aborts, before or during the request', async () => {
    const aborted = AbortSignal.abort();
    expect((await failure(api.get('/', { signal: aborted }))).code).toBe('CANCELLED');
    stub.hang = true;
    const ctl = new AbortController();
    const p = api.get('/', { signal: ctl.signal });
    setTimeout(() => ctl.abort(), 20);
    expect((await failure(p)).code).toBe('CANCELLED');
  });
});
