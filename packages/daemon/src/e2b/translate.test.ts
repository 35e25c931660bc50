import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Code, ConnectError } from '@connectrpc/connect';
import { AegisError } from '@aegis/protocol';
import { describe, expect, it } from 'vitest';
import type { InstanceView } from '../instances/spec.js';
import { Channel } from './channel.js';
import { guestPath, homeOf, userOf } from './context.js';
import { connectError, ERROR_CODE_HEADER, restError } from './errors.js';
import { entryOf, permissions } from './filesystem.js';
import { checkHostAndOrigin, E2bKeys, KEY_FILE, loopbackHost, signatureMatches } from './keys.js';
import { endOf } from './process.js';
import {
  cloudOnly,
  createRequestOf,
  e2bState,
  listedOf,
  metadataOf,
  networkOf,
  page,
  parseMetadataQuery,
  pausedByRequest,
  TEMPLATE_LABEL,
} from './sandboxes.js';
import { parseAddr } from './server.js';
import { hostTarget } from './proxy.js';
import { FileType } from './gen/filesystem/filesystem_pb.js';

const view = (over: Partial<InstanceView> = {}): InstanceView => ({
  id: 'abc123',
  handle: 'i-abc',
  state: 'running',
  command: ['sleep', 'infinity'],
  createdAt: '2026-12-07T10:00:00.000Z',
  memoryMiB: 512,
  vcpuCount: 1,
  exitCode: null,
  ports: [],
  network: 'user',
  volumes: [],
  ...over,
});

describe('E2B create bodies become CreateInstanceRequests', () => {
  it('base is our base rootfs running sleep infinity, throwaway, with the timeout in ms and metadata as labels', () => {
    const req = createRequestOf({ templateID: 'base', timeout: 60, metadata: { team: 'a' }, envVars: { K: 'v' } }, new Set());
    expect(req).toEqual({
      command: ['sleep', 'infinity'],
      env: { K: 'v' },
      labels: { team: 'a', [TEMPLATE_LABEL]: 'base' },
      timeoutMs: 60_000,
      autoRemove: true,
    });
  });

  it('a template that names a snapshot starts from it; any other is an OCI image', () => {
    expect(createRequestOf({ templateID: 'snap-1' }, new Set(['snap-1']))).toMatchObject({ snapshot: 'snap-1' });
    expect(createRequestOf({ templateID: 'python:3.12' }, new Set())).toMatchObject({
      image: 'python:3.12',
      command: ['sleep', 'infinity'],
    });
  });

  it("without a timeout a sandbox lives E2B's default five minutes", () => {
    expect(createRequestOf({ templateID: 'base' }, new Set()).timeoutMs).toBe(300_000);
  });

  it('refuses what it cannot honour with INVALID_ARGUMENT: auto-pause, E2B volumes, reserved or malformed metadata', () => {
    for (const body of [
      { templateID: 'base', autoPause: true },
      { templateID: 'base', volumeMounts: [{ name: 'v', path: '/v' }] },
      { templateID: 'base', metadata: { [TEMPLATE_LABEL]: 'x' } },
      { templateID: 'base', metadata: { 'no spaces allowed': 'x' } },
      { templateID: '' },
      { templateID: 'base', timeout: -1 },
    ]) {
      expect(() => createRequestOf(body, new Set()), JSON.stringify(body)).toThrow(
        expect.objectContaining({ code: 'INVALID_ARGUMENT' }) as Error,
      );
    }
  });

  it('network options map onto our egress: no internet is network none, deny-all plus allowOut an allow-list', () => {
    expect(networkOf({ allow_internet_access: false })).toEqual({ network: 'none' });
    expect(networkOf({ network: { denyOut: ['0.0.0.0/0'], allowOut: ['pypi.org'] } })).toEqual({
      egress: { allow: ['pypi.org'], deny: [] },
    });
    expect(networkOf({ network: { denyOut: ['0.0.0.0/0'] } })).toEqual({ network: 'none' });
    expect(networkOf({ network: { denyOut: ['10.0.0.0/8'] } })).toEqual({ egress: { allow: [], deny: ['10.0.0.0/8'] } });
    expect(networkOf({})).toEqual({});
  });
});

describe('instances seen as E2B sandboxes', () => {
  it('running and starting are running; paused and hibernated are paused; the rest is gone', () => {
    expect(e2bState('running')).toBe('running');
    expect(e2bState('starting')).toBe('running');
    expect(e2bState('paused')).toBe('paused');
    expect(e2bState('hibernated')).toBe('paused');
    expect(e2bState('stopped')).toBeUndefined();
    expect(e2bState('failed')).toBeUndefined();
  });

  it('metadata leaves out our own labels; the template comes from its label', () => {
    const v = view({ labels: { a: '1', [TEMPLATE_LABEL]: 'python:3.12' }, deadline: '2026-12-07T10:05:00.000Z' });
    expect(metadataOf(v)).toEqual({ a: '1' });
    expect(listedOf(v, 4096)).toMatchObject({
      sandboxID: 'abc123',
      templateID: 'python:3.12',
      metadata: { a: '1' },
      endAt: v.deadline,
      state: 'running',
    });
  });

  it('the metadata query is k=v pairs with URI-encoded keys and values', () => {
    const q = new URLSearchParams({ [encodeURIComponent('a b')]: encodeURIComponent('c&d') }).toString();
    expect(parseMetadataQuery(q)).toEqual({ 'a b': 'c&d' });
    expect(parseMetadataQuery(null)).toEqual({});
  });

  it('pages go newest first and a token continues after the last item, with nothing repeated or skipped', () => {
    const items = Array.from({ length: 5 }, (_, i) => ({ id: `id${i}`, createdAt: `2026-12-07T10:00:0${i % 3}.000Z` }));
    const seen: string[] = [];
    let token: string | null = null;
    for (let n = 0; n < 10; n++) {
      const p: { items: typeof items; next: string | undefined } = page(items, 2, token);
      seen.push(...p.items.map((x) => x.id));
      if (!p.next) break;
      token = p.next;
    }
    expect(seen.sort()).toEqual(items.map((x) => x.id).sort());
    expect(page(items, 10, null).next).toBeUndefined();
    expect(() => page(items, 2, '%%%')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }) as Error);
  });

  it('cloud-only paths answer 501 in E2B shape, others are not cloud-only', () => {
    expect(cloudOnly('/teams')).toMatchObject({ status: 501, body: { code: 501 } });
    expect(cloudOnly('/v3/templates')).toMatchObject({ status: 501 });
    expect(cloudOnly('/sandboxes')).toBeUndefined();
  });
});

describe('errors as the e2b SDK maps them', () => {
  it('REST: our code picks the status E2B would answer, in its {code, message} body', () => {
    expect(restError(new AegisError('NOT_FOUND', 'no sandbox'))).toEqual({
      status: 404,
      code: 'NOT_FOUND',
      body: { code: 404, message: 'no sandbox' },
    });
    expect(restError(new AegisError('UNAUTHENTICATED', 'x')).status).toBe(401);
    expect(restError(new AegisError('INVALID_ARGUMENT', 'x')).status).toBe(400);
    expect(restError(new Error('boom'))).toMatchObject({ status: 500, code: 'INTERNAL' });
  });

  it('Connect: NOT_FOUND, TIMEOUT, INVALID_ARGUMENT, UNAUTHENTICATED keep their meaning, with our code in metadata', () => {
    const cases: Array<[AegisError['code'], Code]> = [
      ['NOT_FOUND', Code.NotFound],
      ['TIMEOUT', Code.DeadlineExceeded],
      ['INVALID_ARGUMENT', Code.InvalidArgument],
      ['UNAUTHENTICATED', Code.Unauthenticated],
      ['ALREADY_EXISTS', Code.AlreadyExists],
      ['INTERNAL', Code.Internal],
    ];
    for (const [ours, theirs] of cases) {
      const e = connectError(new AegisError(ours, 'm'));
      expect(e.code, ours).toBe(theirs);
      expect(e.metadata.get(ERROR_CODE_HEADER)).toBe(ours);
    }
    const passthrough = new ConnectError('x', Code.DeadlineExceeded);
    expect(connectError(passthrough)).toBe(passthrough);
  });

  it("an exit is envd's EndEvent: a code, or -1 and `signal: killed` as Go reports a signal", () => {
    expect(endOf({ exitCode: 0, signal: null })).toEqual({ exitCode: 0, exited: true, status: 'exit status 0' });
    expect(endOf({ exitCode: 3, signal: null })).toEqual({ exitCode: 3, exited: true, status: 'exit status 3', error: 'exit status 3' });
    expect(endOf({ exitCode: null, signal: 'SIGKILL' })).toMatchObject({ exitCode: -1, exited: false, error: 'signal: killed' });
    expect(endOf({ exitCode: 143, signal: 'SIGTERM' })).toMatchObject({ exitCode: -1, status: 'signal: terminated' });
  });
});

describe('envd details', () => {
  it("users come from Authorization: Basic base64(user:); paths are relative to that user's home", () => {
    expect(userOf(`Basic ${Buffer.from('user:').toString('base64')}`)).toBe('user');
    expect(userOf(undefined)).toBeUndefined();
    expect(() => userOf('Bearer x')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }) as Error);
    expect(homeOf(undefined)).toBe('/root');
    expect(homeOf('user')).toBe('/home/user');
    expect(guestPath('a/b', undefined)).toBe('/root/a/b');
    expect(guestPath('~/x', 'user')).toBe('/home/user/x');
    expect(guestPath('/etc/../tmp', undefined)).toBe('/tmp');
    expect(() => guestPath('', undefined)).toThrow();
  });

  it("entries carry envd's type, permissions string and times", () => {
    const e = entryOf({ name: 'd', type: 'directory', size: 4096, mode: 0o755, uid: 0, gid: 1000, mtimeMs: 1_700_000_000_123 }, '/x/d');
    expect(e).toMatchObject({
      name: 'd',
      type: FileType.DIRECTORY,
      path: '/x/d',
      size: 4096n,
      mode: 0o755,
      permissions: 'drwxr-xr-x',
      owner: 'root',
      group: '1000',
    });
    expect(e.modifiedTime).toEqual({ seconds: 1_700_000_000n, nanos: 123_000_000 });
    expect(permissions('file', 0o640)).toBe('-rw-r-----');
  });

  it('a channel holds the producer back past its high-water mark and releases it as the consumer reads', async () => {
    const c = new Channel<number>(10);
    expect(c.push(1, 6)).toBeUndefined();
    const held = c.push(2, 6);
    expect(held).toBeInstanceOf(Promise);
    let released = false;
    void held?.then(() => (released = true));
    expect((await c.next()).value).toBe(1);
    await Promise.resolve();
    // Still above half the mark: held.
    expect(released).toBe(false);
    expect((await c.next()).value).toBe(2);
    await Promise.resolve();
    expect(released).toBe(true);
    c.push(3, 1);
    c.end(new Error('gone'));
    // What was queued before the end is still read, then the error.
    expect((await c.next()).value).toBe(3);
    await expect(c.next()).rejects.toThrow('gone');
  });
});

describe('the endpoint’s address and credentials', () => {
  it('listens on loopback only', () => {
    expect(parseAddr('127.0.0.1:3000')).toEqual({ host: '127.0.0.1', port: 3000 });
    expect(parseAddr('[::1]:0')).toEqual({ host: '::1', port: 0 });
    expect(() => parseAddr('0.0.0.0:3000')).toThrow(expect.objectContaining({ code: 'INVALID_ARGUMENT' }) as Error);
    expect(() => parseAddr('3000')).toThrow();
  });

  it('signed file URLs verify as the SDK signs them (v1_ + base64 SHA-256 of path:op:user:token[:expiry])', () => {
    const token = 'tok';
    const raw = 'hello.txt:read::tok:1700000000';
    const signature = `v1_${createHash('sha256').update(raw).digest('base64').replace(/=+$/, '')}`;
    const q = { path: 'hello.txt', operation: 'read' as const, user: '', signature, expiration: '1700000000' };
    expect(signatureMatches(q, token)).toBe(true);
    expect(signatureMatches({ ...q, operation: 'write' }, token)).toBe(false);
    expect(signatureMatches({ ...q, user: 'root' }, token)).toBe(false);
    expect(signatureMatches(q, 'other')).toBe(false);
  });

  it('paused or hibernated by request is unreachable for E2B until connect; for idleness it is not', () => {
    expect(pausedByRequest(view({ state: 'paused' }))).toBe(true);
    expect(pausedByRequest(view({ state: 'paused', idlePaused: true }))).toBe(false);
    expect(pausedByRequest(view({ state: 'hibernated', stateReason: 'hibernated by request' }))).toBe(true);
    expect(pausedByRequest(view({ state: 'hibernated', stateReason: 'hibernated after 1h unused' }))).toBe(false);
    expect(pausedByRequest(view({ state: 'running' }))).toBe(false);
  });

  it('getHost names are <port>-<id>.localhost, with or without our port', () => {
    expect(hostTarget('3000-abc123.localhost:4000')).toEqual({ port: 3000, id: 'abc123' });
    expect(hostTarget('3000-abc123.localhost')).toEqual({ port: 3000, id: 'abc123' });
    expect(hostTarget('localhost:4000')).toBeUndefined();
    expect(hostTarget('0-abc.localhost')).toBeUndefined();
    expect(hostTarget('3000-abc.example.com')).toBeUndefined();
  });

  it('Host must be loopback on our port (DNS rebinding); Origin must be absent or ours', () => {
    const ours = { host: '127.0.0.1', port: 4000 };
    expect(loopbackHost('127.0.0.1:4000', ours)).toBe(true);
    expect(loopbackHost('localhost:4000', ours)).toBe(true);
    expect(loopbackHost('3000-abc.localhost:4000', ours)).toBe(true);
    expect(loopbackHost('[::1]:4000', ours)).toBe(true);
    expect(loopbackHost('127.0.0.1:4001', ours)).toBe(false);
    expect(loopbackHost('evil.example:4000', ours)).toBe(false);
    expect(() => checkHostAndOrigin('127.0.0.1:4000', undefined, ours)).not.toThrow();
    expect(() => checkHostAndOrigin('127.0.0.1:4000', 'http://127.0.0.1:4000', ours)).not.toThrow();
    for (const [host, origin] of [
      ['evil.example', undefined],
      [undefined, undefined],
      ['127.0.0.1:4000', 'https://evil.example'],
      ['127.0.0.1:4000', 'http://localhost:5173'],
      ['127.0.0.1:4000', 'null'],
    ] as const) {
      expect(() => checkHostAndOrigin(host, origin, ours), `${host} ${origin}`).toThrow(
        expect.objectContaining({ code: 'PERMISSION_DENIED' }) as Error,
      );
    }
  });

  it('the key is made 0600 on first use; tokens are per sandbox; a rotation on disk revokes both at the next request', async () => {
    const home = mkdtempSync(path.join(os.tmpdir(), 'aegis-e2b-keys-'));
    try {
      const keys = await E2bKeys.open(home);
      const file = path.join(home, KEY_FILE);
      expect(statSync(file).mode & 0o777).toBe(0o600);
      const key = keys.current();
      expect(key).toMatch(/^e2b_[0-9a-f]{40}$/);
      expect(() => keys.checkApiKey(key)).not.toThrow();
      expect(() => keys.checkApiKey('e2b_nope')).toThrow(expect.objectContaining({ code: 'UNAUTHENTICATED' }) as Error);
      expect(() => keys.checkApiKey(undefined)).toThrow(expect.objectContaining({ code: 'UNAUTHENTICATED' }) as Error);
      const token = keys.accessToken('sbx1');
      expect(token).not.toBe(keys.accessToken('sbx2'));
      expect(() => keys.checkAccessToken('sbx1', token, undefined)).not.toThrow();
      expect(() => keys.checkAccessToken('sbx2', token, undefined)).toThrow(expect.objectContaining({ code: 'UNAUTHENTICATED' }) as Error);
      // What `aegis e2b key --rotate` does: a new file.
      writeFileSync(file, `e2b_${'1'.repeat(40)}\n`, { mode: 0o600 });
      const later = new Date(Date.now() + 5000);
      utimesSync(file, later, later);
      expect(() => keys.checkApiKey(key)).toThrow();
      expect(() => keys.checkAccessToken('sbx1', token, undefined)).toThrow();
      expect(keys.current()).toBe(`e2b_${'1'.repeat(40)}`);
      // Errors never carry the key.
      try {
        keys.checkApiKey('wrong');
      } catch (e) {
        expect(String((e as Error).message)).not.toContain(keys.current());
      }
    } finally {
      rmSync(home, { recursive: true, force: true });
    }
  });
});
