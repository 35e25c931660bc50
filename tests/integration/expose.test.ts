/** --expose: host ports forwarded into the guest over the agent channel. */
import { createHash } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { qemuProcessesFor, useDaemon } from './fixture.js';

const daemon = useDaemon();

function get(port: number, urlPath: string): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path: urlPath, agent: false }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
      res.on('error', reject);
    });
    req.on('error', reject);
  });
}

/** The guest server takes a moment to start after the instance does. */
async function untilServing(port: number, urlPath = '/'): Promise<void> {
  for (let i = 0; i < 150; i++) {
    try {
      if ((await get(port, urlPath)).status === 200) return;
    } catch {
      // not yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`nothing served on ${port}`);
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', () => r()));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((r) => s.close(r));
  return port;
}

describe('--expose', () => {
  it('serves python3 -m http.server from the guest on the chosen host port, shown in list and info', async () => {
    const d = daemon();
    const hostPort = await freePort();
    const r = await d.cli([
      'instance',
      'start',
      '--name',
      'web',
      '--expose',
      `${hostPort}:80`,
      '--',
      'sh',
      '-c',
      'echo hello-from-guest > /tmp/index.txt; cd /tmp && exec python3 -m http.server 80',
    ]);
    expect(r.code).toBe(0);
    await untilServing(hostPort, '/index.txt');
    const res = await get(hostPort, '/index.txt');
    expect(res.body.toString()).toBe('hello-from-guest\n');
    expect((await d.cli(['instance', 'list'])).stdout).toMatch(new RegExp(`127\\.0\\.0\\.1:${hostPort}->80/tcp`));
    expect((await d.cli(['instance', 'info', 'web'])).stdout).toMatch(new RegExp(`Ports:\\s+127\\.0\\.0\\.1:${hostPort}->80/tcp`));
  });

  it('reaches a guest server bound to 127.0.0.1, on a host port chosen for it; 50 parallel requests all succeed', async () => {
    const d = daemon();
    await d.client.createInstance({
      handle: 'lo',
      command: ['python3', '-m', 'http.server', '--bind', '127.0.0.1', '8000'],
      exposes: [{ guestPort: 8000 }],
    });
    const inst = await d.client.getInstance('lo');
    const port = inst.ports[0]?.hostPort ?? 0;
    expect(port).toBeGreaterThan(0);
    expect(inst.ports[0]?.hostIp).toBe('127.0.0.1');
    await untilServing(port);
    const results = await Promise.all(Array.from({ length: 50 }, () => get(port, '/')));
    expect(results.map((x) => x.status)).toEqual(Array(50).fill(200));
  });

  it('moves 200 MiB through the mapping without corruption', async () => {
    const d = daemon();
    await d.client.createInstance({
      handle: 'dl',
      command: [
        'sh',
        '-c',
        'head -c 209715200 /dev/urandom > /tmp/f.bin && sha256sum /tmp/f.bin > /tmp/f.sum && cd /tmp && exec python3 -m http.server 80',
      ],
      exposes: [{ guestPort: 80 }],
    });
    const port = (await d.client.getInstance('dl')).ports[0]?.hostPort ?? 0;
    await untilServing(port, '/f.sum');
    const want = (await get(port, '/f.sum')).body.toString().split(' ')[0];
    const hash = createHash('sha256');
    let size = 0;
    await new Promise<void>((resolve, reject) => {
      http.get({ host: '127.0.0.1', port, path: '/f.bin', agent: false }, (res) => {
        res.on('data', (c: Buffer) => {
          size += c.length;
          hash.update(c);
        });
        res.on('end', resolve);
        res.on('error', reject);
      });
    });
    expect(size).toBe(209715200);
    expect(hash.digest('hex')).toBe(want);
  }, 300_000);

  it('refuses a host port in use, a port another instance holds, and a port out of range, before any VM boots', async () => {
    const d = daemon();
    const busy = net.createServer();
    await new Promise<void>((r) => busy.listen(0, '127.0.0.1', () => r()));
    const busyPort = (busy.address() as net.AddressInfo).port;
    try {
      const inUse = await d.cli(['run', '-p', `${busyPort}:80`, '--', 'true']);
      expect(inUse.stderr).toBe(
        `aegis: host port 127.0.0.1:${busyPort} is already in use; pick another or omit it to get a free one [ALREADY_EXISTS]\n`,
      );
    } finally {
      busy.close();
    }
    const held = await freePort();
    await d.client.createInstance({ handle: 'holder', command: ['sleep', '600'], exposes: [{ guestPort: 80, hostPort: held }] });
    const second = await d.cli(['instance', 'start', '--name', 'second', '-p', `${held}:80`, '--', 'true']);
    expect(second.stderr).toMatch(/already in use.*\[ALREADY_EXISTS\]/);
    const range = await d.cli(['run', '-p', '70000:80', '--', 'true']);
    expect(range.code).not.toBe(0);
    expect(range.stderr).toMatch(/ports are 1-65535/);
    const api = await d.client.createInstance({ command: ['true'], exposes: [{ guestPort: 0 }] }).catch((e: unknown) => e);
    expect(api).toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect((await d.client.listInstances({ all: true })).map((i) => i.handle)).toEqual(['holder']);
    expect(await qemuProcessesFor(d.home)).toHaveLength(1);
  });

  it('stops with the instance, and comes back after an aegisd restart', async () => {
    const d = daemon();
    const port = await freePort();
    await d.client.createInstance({
      handle: 'svc',
      command: ['python3', '-m', 'http.server', '80'],
      exposes: [{ guestPort: 80, hostPort: port }],
    });
    await untilServing(port);
    await d.kill();
    await d.start();
    await untilServing(port);
    await d.client.stopInstance('svc');
    await expect(get(port, '/')).rejects.toMatchObject({ code: 'ECONNREFUSED' });
  });

  it('comes back on the same host port when the instance is restarted, with its files, env and secrets', async () => {
    const d = daemon();
    await d.client.setSecret('TOKEN', 's3cr3t-restart');
    const inst = await d.client.createInstance({
      handle: 'again',
      command: ['sh', '-c', 'echo "$GREETING $TOKEN" >> /srv.log; cd / && exec python3 -m http.server 80'],
      env: { GREETING: 'hi' },
      secrets: ['TOKEN'],
      exposes: [{ guestPort: 80 }],
    });
    const port = inst.ports[0]?.hostPort ?? 0;
    await untilServing(port, '/srv.log');
    await d.client.stopInstance('again');
    await expect(get(port, '/')).rejects.toMatchObject({ code: 'ECONNREFUSED' });
    const r = await d.cli(['instance', 'restart', 'again']);
    expect(r.stdout).toBe('again\n');
    expect((await d.client.getInstance('again')).ports[0]?.hostPort).toBe(port);
    await untilServing(port, '/srv.log');
    // The file written before the stop is still there: the instance kept its own disk.
    expect((await get(port, '/srv.log')).body.toString()).toBe('hi s3cr3t-restart\nhi s3cr3t-restart\n');
    // Restarting a running instance stops it first.
    await d.client.restartInstance('again');
    await untilServing(port, '/srv.log');
    expect((await get(port, '/srv.log')).body.toString().split('\n').length).toBe(4);
  });
});
