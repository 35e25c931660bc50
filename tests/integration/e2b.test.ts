/**
 * E2B's own TypeScript SDK (the `e2b` npm package, pinned at 2.51.0), unmodified, against a real
 * aegisd serving the E2B endpoint (AEGIS_E2B_ADDR) and real VMs: E2B-style user code for each
 * thing issue 23 lists, the SDK's error classes included. VMs are shared between cases that do
 * not need a fresh one (TCG: seconds per VM).
 */
import { existsSync, mkdtempSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  InvalidArgumentError,
  NotFoundError,
  Sandbox,
  SandboxError,
  TimeoutError,
} from 'e2b';
import { createClient } from '@connectrpc/connect';
import { createConnectTransport } from '@connectrpc/connect-node';
import { Process } from '../../packages/daemon/src/e2b/gen/process/process_pb.js';
import { TestDaemon, teardown, until } from './fixture.js';

let daemon: TestDaemon;
let failed = false;
let url = '';
let key = '';
/** The sandbox most cases share. */
let sbx: Sandbox;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function raw(
  method: string,
  p: string,
  headers: Record<string, string>,
  body?: string,
): Promise<{ status: number; body: string; headers: http.IncomingHttpHeaders }> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${url}${p}`, { method, headers }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text, headers: res.headers }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

beforeAll(async () => {
  daemon = new TestDaemon(mkdtempSync('/tmp/aegis-it-'), { AEGIS_E2B_ADDR: '127.0.0.1:0' });
  await daemon.start();
  await until(() => existsSync(path.join(daemon.home, 'e2b.addr')), 10_000, 'the E2B endpoint');
  // What a user's shell gets from `eval "$(aegis e2b env)"`.
  const env = await daemon.cli(['e2b', 'env']);
  expect(env.code, env.stderr).toBe(0);
  const m = /^export E2B_API_URL=(\S+) E2B_SANDBOX_URL=(\S+) E2B_API_KEY=(\S+)\n$/.exec(env.stdout);
  expect(m, env.stdout).not.toBeNull();
  url = m?.[1] ?? '';
  key = m?.[3] ?? '';
  expect(m?.[2]).toBe(url);
  process.env['E2B_API_URL'] = url;
  process.env['E2B_SANDBOX_URL'] = url;
  process.env['E2B_API_KEY'] = key;
  sbx = await Sandbox.create({ metadata: { suite: 'e2b', role: 'shared' }, envs: { GREETING: 'hello' }, timeoutMs: 600_000 });
});

afterAll(async () => {
  if (daemon) await teardown(daemon, failed);
});

describe('the e2b SDK against aegisd', () => {
  it('Sandbox.create makes an ordinary instance: aegis ps shows it, metadata are its labels, envs reach every command', async () => {
    try {
      const ps = await daemon.cli(['ps', '--json']);
      const rows = JSON.parse(ps.stdout) as Array<{ id: string; labels?: Record<string, string> }>;
      const row = rows.find((r) => r.id === sbx.sandboxId);
      expect(row?.labels).toMatchObject({ suite: 'e2b', role: 'shared' });
      const r = await sbx.commands.run('echo "$GREETING"; pwd; whoami');
      expect(r).toMatchObject({ exitCode: 0, stdout: 'hello\n/root\nroot\n', stderr: '' });
      expect(await sbx.isRunning()).toBe(true);
    } catch (err) {
      failed = true;
      throw err;
    }
  });

  it('commands.run streams stdout and stderr as they come, with cwd, user and envs', async () => {
    try {
      const out: string[] = [];
      const err: string[] = [];
      const r = await sbx.commands.run('for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.2; done; pwd; echo $X', {
        cwd: '/tmp',
        user: 'root',
        envs: { X: 'from-envs' },
        onStdout: (d) => void out.push(d),
        onStderr: (d) => void err.push(d),
      });
      expect(r.stdout).toBe('out1\nout2\nout3\n/tmp\nfrom-envs\n');
      expect(r.stderr).toBe('err1\nerr2\nerr3\n');
      expect(out.length).toBeGreaterThanOrEqual(3);
      expect(err.join('')).toBe('err1\nerr2\nerr3\n');
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('a non-zero exit raises CommandExitError with the code and the output; timeoutMs kills a command with TimeoutError', async () => {
    try {
      const exit = await sbx.commands.run('echo partial; exit 3').catch((e: unknown) => e);
      expect(exit).toBeInstanceOf(CommandExitError);
      expect(exit).toMatchObject({ exitCode: 3, stdout: 'partial\n' });
      const t0 = Date.now();
      const slow = await sbx.commands.run('sleep 30', { timeoutMs: 1500 }).catch((e: unknown) => e);
      expect(slow).toBeInstanceOf(TimeoutError);
      expect(Date.now() - t0).toBeLessThan(10_000);
      // It is gone (killed), not left running.
      await until(async () => (await sbx.commands.list()).every((p) => !p.args.includes('sleep 30')), 5000, 'the timed-out command to end');
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('background commands: list, sendStdin and closeStdin, kill, and connect after a disconnect', async () => {
    try {
      const cat = await sbx.commands.run('cat', { background: true, stdin: true });
      expect((await sbx.commands.list()).map((p) => p.pid)).toContain(cat.pid);
      await sbx.commands.sendStdin(cat.pid, 'piped in\n');
      await sbx.commands.closeStdin(cat.pid);
      expect((await cat.wait()).stdout).toBe('piped in\n');

      const sleeper = await sbx.commands.run('sleep 100', { background: true });
      expect(await sbx.commands.kill(sleeper.pid)).toBe(true);
      const killed = await sleeper.wait().catch((e: unknown) => e);
      expect(killed).toBeInstanceOf(CommandExitError);
      expect(killed).toMatchObject({ exitCode: -1, error: 'signal: killed' });
      expect(await sbx.commands.kill(sleeper.pid)).toBe(false);

      const later = await sbx.commands.run('sleep 1; echo later', { background: true });
      await later.disconnect();
      let seen = '';
      const again = await sbx.commands.connect(later.pid, { onStdout: (d) => void (seen += d) });
      await again.wait();
      expect(seen).toBe('later\n');
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('pty: a terminal of the size asked, resized, driven by sendInput', async () => {
    try {
      let out = '';
      const term = await sbx.pty.create({ cols: 80, rows: 24, onData: (d) => void (out += new TextDecoder().decode(d)) });
      await sbx.pty.resize(term.pid, { cols: 100, rows: 30 });
      await sbx.pty.sendInput(term.pid, new TextEncoder().encode('stty size; exit\n'));
      await term.wait().catch(() => undefined);
      expect(out).toContain('30 100');
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('files: text, bytes, streams and several at once; list with depth, exists, getInfo, makeDir, rename, remove', async () => {
    try {
      const one = await sbx.files.write('/tmp/f/a.txt', 'text file');
      expect(one).toMatchObject({ name: 'a.txt', path: '/tmp/f/a.txt' });
      expect(await sbx.files.read('/tmp/f/a.txt')).toBe('text file');
      const many = await sbx.files.write([
        { path: '/tmp/f/sub/b.bin', data: new Uint8Array([0, 1, 2, 255]).buffer },
        { path: 'relative.txt', data: 'in home' },
      ]);
      expect(many.map((e) => e.path)).toEqual(['/tmp/f/sub/b.bin', '/root/relative.txt']);
      expect(Array.from(await sbx.files.read('/tmp/f/sub/b.bin', { format: 'bytes' }))).toEqual([0, 1, 2, 255]);
      expect(await sbx.files.read('/root/relative.txt')).toBe('in home');
      // Signed URLs (no header: the signature names the sandbox), and an expired one refused.
      expect(await (await fetch(await sbx.downloadUrl('relative.txt'))).text()).toBe('in home');
      const expired = await fetch(await sbx.downloadUrl('relative.txt', { useSignatureExpiration: -10 }));
      expect(expired.status).toBe(401);
      expect(await expired.json()).toEqual({ code: 401, message: 'signature is already expired' });

      const big = new Uint8Array(4 << 20).map((_, i) => i % 251);
      await sbx.files.write('/tmp/f/big', new Blob([big]).stream());
      const stream = await sbx.files.read('/tmp/f/big', { format: 'stream' });
      const chunks: Uint8Array[] = [];
      for await (const c of stream) chunks.push(c);
      expect(Buffer.concat(chunks).equals(Buffer.from(big))).toBe(true);

      expect((await sbx.files.list('/tmp/f')).map((e) => e.name).sort()).toEqual(['a.txt', 'big', 'sub']);
      expect((await sbx.files.list('/tmp/f', { depth: 2 })).map((e) => e.path).sort()).toEqual([
        '/tmp/f/a.txt',
        '/tmp/f/big',
        '/tmp/f/sub',
        '/tmp/f/sub/b.bin',
      ]);
      expect(await sbx.files.exists('/tmp/f/a.txt')).toBe(true);
      expect(await sbx.files.exists('/tmp/f/none')).toBe(false);
      const info = await sbx.files.getInfo('/tmp/f/sub');
      expect(info).toMatchObject({ name: 'sub', type: 'dir', path: '/tmp/f/sub', owner: 'root' });
      expect(await sbx.files.makeDir('/tmp/f/new/deep')).toBe(true);
      expect(await sbx.files.makeDir('/tmp/f/new/deep')).toBe(false);
      expect(await sbx.files.rename('/tmp/f/a.txt', '/tmp/f/new/a2.txt')).toMatchObject({ name: 'a2.txt', type: 'file', size: 9 });
      expect(await sbx.files.exists('/tmp/f/a.txt')).toBe(false);
      await sbx.files.remove('/tmp/f');
      expect(await sbx.files.exists('/tmp/f')).toBe(false);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('a missing file raises FileNotFoundError (a NotFoundError), on read, getInfo and list; a bad one InvalidArgumentError', async () => {
    try {
      // Not a directory (Connect InvalidArgument), and a write onto a directory (envd's HTTP 400).
      await expect(sbx.files.list('/etc/hostname')).rejects.toBeInstanceOf(InvalidArgumentError);
      await expect(sbx.files.write('/etc', 'x')).rejects.toBeInstanceOf(InvalidArgumentError);
      for (const call of [() => sbx.files.read('/no/such'), () => sbx.files.getInfo('/no/such'), () => sbx.files.list('/no/such')]) {
        const e = await call().catch((err: unknown) => err);
        expect(e).toBeInstanceOf(FileNotFoundError);
        expect(e).toBeInstanceOf(NotFoundError);
      }
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('watchDir reports files created, written and removed', async () => {
    try {
      await sbx.files.makeDir('/tmp/watched');
      const events: Array<[string, string]> = [];
      const w = await sbx.files.watchDir('/tmp/watched', (e) => void events.push([e.type, e.name]));
      await sbx.files.write('/tmp/watched/new.txt', 'a');
      await until(() => events.some(([t, n]) => t === 'create' && n === 'new.txt'), 10_000, 'the create event');
      await sbx.files.write('/tmp/watched/new.txt', 'longer');
      await until(() => events.some(([t]) => t === 'write'), 10_000, 'the write event');
      await sbx.files.remove('/tmp/watched/new.txt');
      await until(() => events.some(([t]) => t === 'remove'), 10_000, 'the remove event');
      await w.stop();
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('getHost(port) reaches a server the guest runs, by its <port>-<id>.localhost name or the sandbox headers', async () => {
    try {
      await sbx.files.write('/srv/www/hello.txt', 'served from the guest');
      await sbx.commands.run('python3 -m http.server 8000 --directory /srv/www', { background: true });
      const host = sbx.getHost(8000);
      expect(host).toBe(`8000-${sbx.sandboxId}.localhost:${new URL(url).port}`);
      let answer = { status: 0, body: '' };
      await until(
        async () => {
          answer = await raw('GET', '/hello.txt', { host });
          return answer.status === 200;
        },
        30_000,
        'the guest server',
      );
      expect(answer.body).toBe('served from the guest');
      const viaHeaders = await fetch(`${url}/hello.txt`, { headers: { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '8000' } });
      expect(await viaHeaders.text()).toBe('served from the guest');
      const closed = await raw('GET', '/', { host: `8001-${sbx.sandboxId}.localhost:${new URL(url).port}` });
      expect(closed.status).toBe(503);
      expect(closed.body).toContain('port 8001');
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('getInfo, setTimeout and getMetrics describe the sandbox', async () => {
    try {
      const info = await sbx.getInfo();
      expect(info).toMatchObject({
        sandboxId: sbx.sandboxId,
        templateId: 'base',
        state: 'running',
        metadata: { suite: 'e2b', role: 'shared' },
      });
      await sbx.setTimeout(900_000);
      const after = await sbx.getInfo();
      expect(after.endAt.getTime() - Date.now()).toBeGreaterThan(800_000);
      const metrics = await sbx.getMetrics();
      expect(metrics.length).toBe(1);
      expect(metrics[0]?.memTotal).toBeGreaterThan(100 << 20);
      expect(metrics[0]?.cpuCount).toBe(1);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('Sandbox.list filters by metadata and state, and pages with limit and nextToken', async () => {
    const extra = await Promise.all([
      Sandbox.create({ metadata: { suite: 'e2b', role: 'listed' }, timeoutMs: 120_000 }),
      Sandbox.create({ metadata: { suite: 'e2b', role: 'listed' }, timeoutMs: 120_000 }),
    ]);
    try {
      const listed = await Sandbox.list({ query: { metadata: { role: 'listed' } } }).nextItems();
      expect(listed.map((s) => s.sandboxId).sort()).toEqual(extra.map((s) => s.sandboxId).sort());
      expect(await Sandbox.list({ query: { metadata: { role: 'listed' }, state: ['paused'] } }).nextItems()).toEqual([]);
      const pager = Sandbox.list({ query: { metadata: { suite: 'e2b' } }, limit: 2 });
      const seen: string[] = [];
      while (pager.hasNext) seen.push(...(await pager.nextItems()).map((s) => s.sandboxId));
      expect(seen.sort()).toEqual([sbx.sandboxId, ...extra.map((s) => s.sandboxId)].sort());
    } catch (e) {
      failed = true;
      throw e;
    } finally {
      await Promise.all(extra.map((s) => s.kill()));
    }
  });

  it('pause hibernates the sandbox (durable), and connect resumes it where it was', async () => {
    const s = await Sandbox.create({ timeoutMs: 300_000 });
    try {
      await s.files.write('/root/kept.txt', 'before pause');
      await s.commands.run('sleep 1000', { background: true });
      expect(await s.pause()).toBe(true);
      expect(await s.pause()).toBe(false);
      expect((await s.getInfo()).state).toBe('paused');
      // As in E2B: unreachable until connect.
      expect(await s.isRunning()).toBe(false);
      const ps = await daemon.cli(['ps', '--json']);
      expect((JSON.parse(ps.stdout) as Array<{ id: string; state: string }>).find((r) => r.id === s.sandboxId)?.state).toBe('hibernated');
      const back = await Sandbox.connect(s.sandboxId);
      expect((await back.getInfo()).state).toBe('running');
      expect(await back.files.read('/root/kept.txt')).toBe('before pause');
      // Its processes carried on: the memory came back.
      expect((await back.commands.run('pgrep -f "sleep 1000" >/dev/null && echo alive')).stdout).toBe('alive\n');
    } catch (e) {
      failed = true;
      throw e;
    } finally {
      await s.kill();
    }
  });

  it('fork and createSnapshot: a fork has the files; Sandbox.create from a snapshot starts where it was', async () => {
    const made: Sandbox[] = [];
    try {
      await sbx.files.write('/root/state.txt', 'forked state');
      const forks = await Sandbox.fork(sbx.sandboxId);
      expect(forks.length).toBe(1);
      const fork = forks[0];
      if (!(fork instanceof Sandbox)) throw fork ?? new Error('no fork');
      made.push(fork);
      expect(fork.sandboxId).not.toBe(sbx.sandboxId);
      expect(await fork.files.read('/root/state.txt')).toBe('forked state');

      const snap = await sbx.createSnapshot();
      expect(snap.snapshotId).toBeTruthy();
      expect((await Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }).nextItems()).map((x) => x.snapshotId)).toContain(snap.snapshotId);
      const fromSnap = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 });
      made.push(fromSnap);
      expect(await fromSnap.files.read('/root/state.txt')).toBe('forked state');
      await fromSnap.kill();
      made.pop();
      expect(await Sandbox.deleteSnapshot(snap.snapshotId)).toBe(true);
      expect(await Sandbox.deleteSnapshot(snap.snapshotId)).toBe(false);
    } catch (e) {
      failed = true;
      throw e;
    } finally {
      for (const s of made) await s.kill().catch(() => undefined);
    }
  });

  it('kill removes the instance; the SDK then reports it not found', async () => {
    const s = await Sandbox.create({ timeoutMs: 120_000 });
    try {
      // A command in flight when its sandbox is killed: the SDK's TimeoutError, saying so.
      const running = s.commands.run('sleep 60').catch((e: unknown) => e);
      await sleep(1500);
      expect(await s.kill()).toBe(true);
      const cut = await running;
      expect(cut).toBeInstanceOf(TimeoutError);
      expect(String(cut)).toContain('killed');
      expect(await Sandbox.kill(s.sandboxId)).toBe(false);
      await expect(Sandbox.getInfo(s.sandboxId)).rejects.toBeInstanceOf(NotFoundError);
      await expect(Sandbox.connect(s.sandboxId)).rejects.toBeInstanceOf(NotFoundError);
      const run = await s.commands.run('true').catch((e: unknown) => e);
      expect(run).toBeInstanceOf(SandboxError);
      const ps = await daemon.cli(['ps', '-a', '--json']);
      expect((JSON.parse(ps.stdout) as Array<{ id: string }>).map((r) => r.id)).not.toContain(s.sandboxId);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('auth: a wrong API key raises AuthenticationError; a wrong access token, a foreign Host or Origin is refused', async () => {
    try {
      await expect(Sandbox.list({ apiKey: 'e2b_0000000000000000000000000000000000000000' }).nextItems()).rejects.toBeInstanceOf(
        AuthenticationError,
      );
      const ok = { 'x-api-key': key };
      expect((await raw('GET', '/v2/sandboxes', {})).status).toBe(401);
      expect((await raw('GET', '/v2/sandboxes', ok)).status).toBe(200);
      const rebound = await raw('GET', '/v2/sandboxes', { ...ok, host: 'attacker.example' });
      expect(rebound.status).toBe(403);
      expect(rebound.headers['x-aegis-error-code']).toBe('PERMISSION_DENIED');
      expect((await raw('GET', '/v2/sandboxes', { ...ok, origin: 'https://attacker.example' })).status).toBe(403);
      const envd = await raw('GET', '/files?path=/etc/hostname', { 'e2b-sandbox-id': sbx.sandboxId, 'x-access-token': 'wrong' });
      expect(envd.status).toBe(401);
      expect(envd.body).not.toContain(key);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it("what belongs to E2B's cloud answers 501 in E2B's error shape, and a bad request InvalidArgument-style 400", async () => {
    try {
      const ok = { 'x-api-key': key, 'content-type': 'application/json' };
      for (const p of ['/teams', '/templates', '/v3/templates', '/volumes', '/secrets']) {
        const r = await raw('GET', p, ok);
        expect(r.status, p).toBe(501);
        expect(JSON.parse(r.body)).toMatchObject({ code: 501, message: expect.stringContaining('not served') as unknown });
      }
      const bad = await raw('POST', '/sandboxes', ok, JSON.stringify({ templateID: 'base', metadata: { 'bad key!': 'x' } }));
      expect(bad.status).toBe(400);
      expect(JSON.parse(bad.body)).toMatchObject({ code: 400 });
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it("envd's process service answers Connect's binary encoding over HTTP/2 too", async () => {
    try {
      const token = (await raw('GET', `/sandboxes/${sbx.sandboxId}`, { 'x-api-key': key })).body;
      const access = (JSON.parse(token) as { envdAccessToken: string }).envdAccessToken;
      const transport = createConnectTransport({
        baseUrl: url,
        httpVersion: '2',
        useBinaryFormat: true,
        interceptors: [
          (next) => (req) => {
            req.header.set('e2b-sandbox-id', sbx.sandboxId);
            req.header.set('e2b-sandbox-port', '49983');
            req.header.set('x-access-token', access);
            return next(req);
          },
        ],
      });
      const client = createClient(Process, transport);
      let out = '';
      let exit: number | undefined;
      for await (const ev of client.start({ process: { cmd: '/bin/echo', args: ['over', 'h2'] } })) {
        const e = ev.event?.event;
        if (e?.case === 'data' && e.value.output.case === 'stdout') out += Buffer.from(e.value.output.value).toString();
        if (e?.case === 'end') exit = e.value.exitCode;
      }
      expect(out).toBe('over h2\n');
      expect(exit).toBe(0);
    } catch (e) {
      failed = true;
      throw e;
    }
  });

  it('aegis e2b key --rotate revokes the old key at once', async () => {
    try {
      const old = key;
      const rotated = await daemon.cli(['e2b', 'key', '--rotate']);
      expect(rotated.code).toBe(0);
      const fresh = rotated.stdout.trim();
      expect(fresh).not.toBe(old);
      // mtime resolution: make sure the daemon sees a change.
      await sleep(10);
      expect((await raw('GET', '/v2/sandboxes', { 'x-api-key': old })).status).toBe(401);
      expect((await raw('GET', '/v2/sandboxes', { 'x-api-key': fresh })).status).toBe(200);
      key = fresh;
      process.env['E2B_API_KEY'] = fresh;
    } catch (e) {
      failed = true;
      throw e;
    }
  });
});
