/**
 * Idle pause on real VMs (`--idle-pause`, `idlePauseMs`, AEGIS_IDLE_PAUSE): an instance nobody
 * uses is paused (its VMM stops costing CPU) with the reason shown, and the next exec, files
 * call, `logs --follow` or connection to an exposed port wakes it first; the caller waits and
 * gets its answer. A user's pause is never woken by use.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';
import type { Instance } from '@aegis/client';
import { codeOf } from '../support/rejection.js';
import { ROOT, TestDaemon, ownDaemon, teardown, useDaemon } from './fixture.js';

const daemon = useDaemon();

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const IDLE_MS = 2000;
const REASON = 'idle for 2s; wakes on exec, logs --follow, files or a connection';

/** Polls until `h` is idle-paused; returns when it was first seen so. */
async function untilIdlePaused(d: TestDaemon, h: string, withinMs = 20_000): Promise<number> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const i = await d.client.getInstance(h);
    if (i.state === 'paused' && i.idlePaused === true) return Date.now();
    if (i.state !== 'running' || Date.now() > deadline) throw new Error(`${h} was not idle-paused: ${JSON.stringify(i)}`);
    await sleep(100);
  }
}

/** One HTTP/1.0 request on a raw socket; resolves with the whole answer (the server closes). */
function request(socket: net.Socket, urlPath: string): Promise<string> {
  return new Promise((resolve, reject) => {
    let got = '';
    socket.on('data', (c: Buffer) => (got += c.toString()));
    socket.on('end', () => resolve(got));
    socket.on('error', reject);
    socket.write(`GET ${urlPath} HTTP/1.0\r\nHost: x\r\n\r\n`);
  });
}

function connect(port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1', () => resolve(s));
    s.once('error', reject);
  });
}

async function get(port: number, urlPath: string): Promise<string> {
  const s = await connect(port);
  try {
    return await request(s, urlPath);
  } finally {
    s.destroy();
  }
}

/** Starts a guest web server behind --expose (a free host port) and waits until it answers. */
async function webServer(d: TestDaemon, h: string): Promise<number> {
  const r = await d.cli([
    'run',
    '-d',
    '--name',
    h,
    '--network',
    'none',
    '--idle-pause',
    '2s',
    '-p',
    '80',
    '--',
    'sh',
    '-c',
    // http.server logs each request on stderr: output is use, so the idle time starts after the last one.
    'echo hello-from-guest > /tmp/index.txt; cd /tmp && exec python3 -m http.server 80',
  ]);
  expect(r.code, r.stderr).toBe(0);
  const port = (await d.client.getInstance(h)).ports[0]?.hostPort ?? 0;
  for (let i = 0; i < 150; i++) {
    if (
      await get(port, '/index.txt').then(
        (a) => a.includes('hello-from-guest'),
        () => false,
      )
    )
      return port;
    await sleep(200);
  }
  throw new Error('the guest server never answered');
}

describe('idle pause', () => {
  it('pauses after the idle time with why in info, ps and stats; a busy loop that prints nothing then costs no CPU', async () => {
    const d = daemon();
    const r = await d.cli([
      'run',
      '-d',
      '--name',
      'spin',
      '--network',
      'none',
      '--idle-pause',
      '2s',
      '--',
      'sh',
      '-c',
      'while :; do :; done',
    ]);
    expect(r.code, r.stderr).toBe(0);
    const started = Date.now();
    const inst = await d.client.getInstance('spin');
    expect(inst.idlePauseMs).toBe(IDLE_MS);
    expect(inst.state).toBe('running');
    const pausedAt = await untilIdlePaused(d, 'spin');
    // Its idle time started when it began running, a moment before `run -d` returned.
    expect(pausedAt - started).toBeGreaterThanOrEqual(IDLE_MS - 300);
    expect((await d.client.getInstance('spin')).stateReason).toBe(REASON);

    const info = (await d.cli(['instance', 'info', 'spin'])).stdout;
    expect(info).toMatch(/^State: +paused \(idle\)$/m);
    expect(info).toContain(`Reason:    ${REASON}`);
    expect(info).toMatch(/^Idle: +pauses after 2s unused$/m);
    expect((await d.cli(['ps'])).stdout).toMatch(/^spin +[0-9a-f]{12} +paused \(idle\) /m);
    expect((await d.cli(['ps', '--filter', 'status=paused', '-q'])).stdout).toBe(`${inst.id.slice(0, 12)}\n`);

    // Spinning in the guest is not use (no output, no I/O with the host), and frozen it costs nothing.
    await d.client.instanceStats('spin');
    await sleep(1000);
    const stats = await d.client.instanceStats('spin');
    expect(stats.state).toBe('paused');
    expect(stats.idlePaused).toBe(true);
    expect(stats.cpuPercent).not.toBeNull();
    expect(stats.cpuPercent ?? 100).toBeLessThan(5);
    expect((await d.cli(['stats', '--no-stream', 'spin'])).stdout).toMatch(/^spin \(idle\) +[0-9a-f]{12} /m);
  });

  it('exec wakes it: the caller waits, gets the right output and status, and the idle time starts again', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'ex', command: ['sleep', '600'], network: 'none', idlePauseMs: IDLE_MS });
    await untilIdlePaused(d, 'ex');
    const t0 = Date.now();
    const r = await d.cli(['exec', 'ex', '--', 'sh', '-c', 'echo woken; cat /proc/uptime >/dev/null; exit 3']);
    expect(r.stdout).toBe('woken\n');
    expect(r.code).toBe(3);
    const after = await d.client.getInstance('ex');
    expect(after.state).toBe('running');
    expect(after.idlePaused).toBeUndefined();
    expect(after.stateReason).toBeUndefined();
    // Paused again once unused for its idle time after the exec ended.
    const again = await untilIdlePaused(d, 'ex');
    expect(again - t0).toBeGreaterThanOrEqual(IDLE_MS);
    // Several execs at once: one resume, every one answered.
    const all = await Promise.all([1, 2, 3].map((n) => d.cli(['exec', 'ex', '--', 'echo', `n${n}`])));
    expect(all.map((x) => x.stdout)).toEqual(['n1\n', 'n2\n', 'n3\n']);
    expect(d.log().match(/ex \([0-9a-f]+\): woken by exec/g)?.length).toBe(2);
  });

  it('a new TCP connection through --expose wakes it and gets its answer; so do bytes on a connection opened before the pause', async () => {
    const d = daemon();
    const port = await webServer(d, 'web');
    // A connection opened while it runs, then left quiet.
    const early = await connect(port);
    onTestFinished(() => void early.destroy());
    await untilIdlePaused(d, 'web');

    const t0 = Date.now();
    const answer = await get(port, '/index.txt');
    expect(answer).toMatch(/^HTTP\/1\.0 200 /);
    expect(answer.endsWith('hello-from-guest\n')).toBe(true);
    expect((await d.client.getInstance('web')).state).toBe('running');
    expect(Date.now() - t0).toBeLessThan(10_000);

    await untilIdlePaused(d, 'web');
    const late = await request(early, '/index.txt');
    expect(late).toMatch(/^HTTP\/1\.0 200 /);
    expect(late.endsWith('hello-from-guest\n')).toBe(true);
    expect((await d.client.getInstance('web')).state).toBe('running');
  });

  it('the files API and aegis cp wake it, in and out', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'fs', command: ['sleep', '600'], network: 'none', idlePauseMs: IDLE_MS });
    const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-idle-cp-'));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    writeFileSync(path.join(dir, 'in.txt'), 'copied in while idle\n');
    await untilIdlePaused(d, 'fs');
    const cpIn = await d.cli(['cp', path.join(dir, 'in.txt'), 'fs:/root/in.txt']);
    expect(cpIn.code, cpIn.stderr).toBe(0);
    expect((await d.client.getInstance('fs')).state).toBe('running');

    await untilIdlePaused(d, 'fs');
    const cpOut = await d.cli(['cp', 'fs:/root/in.txt', path.join(dir, 'out.txt')]);
    expect(cpOut.code, cpOut.stderr).toBe(0);
    expect(readFileSync(path.join(dir, 'out.txt'), 'utf8')).toBe('copied in while idle\n');

    await untilIdlePaused(d, 'fs');
    const st = await d.client.statFile('fs', '/root/in.txt');
    expect(st.size).toBe(21);
    expect((await d.client.getInstance('fs')).state).toBe('running');
  });

  it('logs --follow wakes it, and sees what it prints next', async () => {
    const d = daemon();
    // Prints a line only when /tmp/go appears: quiet until then, so it idles.
    await d.client.createInstance({
      handle: 'lf',
      command: ['sh', '-c', 'echo first; while [ ! -e /tmp/go ]; do sleep 0.2; done; echo second; exec sleep 600'],
      network: 'none',
      idlePauseMs: IDLE_MS,
    });
    await untilIdlePaused(d, 'lf');
    const follower = spawn(path.join(ROOT, 'bin/aegis'), ['logs', '--follow', 'lf'], { env: d.env });
    onTestFinished(() => void follower.kill());
    let out = '';
    follower.stdout.on('data', (c: Buffer) => (out += c.toString()));
    for (let i = 0; i < 100 && (await d.client.getInstance('lf')).state !== 'running'; i++) await sleep(100);
    expect((await d.client.getInstance('lf')).state).toBe('running');
    await d.client.makeDirectory('lf', '/tmp/go');
    for (let i = 0; i < 100 && !out.includes('second'); i++) await sleep(100);
    expect(out).toBe('first\nsecond\n');
  });

  it("a user's pause is not woken: exec keeps failing FAILED_PRECONDITION, and it stays paused past its idle time", async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'up', command: ['sleep', '600'], network: 'none', idlePauseMs: IDLE_MS });
    expect((await d.cli(['instance', 'pause', 'up'])).code).toBe(0);
    const r = await d.cli(['exec', 'up', '--', 'true']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/it is paused; resume it first.*\[FAILED_PRECONDITION\]/);
    await sleep(IDLE_MS + 500);
    const i = await d.client.getInstance('up');
    expect(i.state).toBe('paused');
    expect(i.idlePaused).toBeUndefined();
    expect((await d.cli(['ps'])).stdout).toMatch(/^up +[0-9a-f]{12} +paused /m);
    // Resumed by the user, it idles again; `pause` then makes an idle pause the user's.
    await d.client.resumeInstance('up');
    await untilIdlePaused(d, 'up');
    await d.client.pauseInstance('up');
    expect((await d.client.getInstance('up')).idlePaused).toBeUndefined();
    expect(await codeOf(d.client.statFile('up', '/'))).toBe('FAILED_PRECONDITION');
  });

  it('an attached run is not paused while its client waits: a workload quiet for longer than the idle time finishes', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--network', 'none', '--idle-pause', '1s', '--', 'sh', '-c', 'sleep 3; echo done'], {
      timeoutMs: 30_000,
    });
    expect(r.stdout).toBe('done\n');
    expect(r.code).toBe(0);
  });

  it('bad values: one line naming the flag (INVALID_ARGUMENT) from the CLI, INVALID_ARGUMENT from the API', async () => {
    const d = daemon();
    const soon = await d.cli(['run', '--idle-pause', 'soon', '--', 'true']);
    expect(soon.code).toBe(125);
    expect(soon.stderr).toMatch(/^aegis: .*--idle-pause.*"soon" is not a duration.*\[INVALID_ARGUMENT\]\n$/);
    const short = await d.cli(['instance', 'start', '--idle-pause', '500ms', '--', 'true']);
    expect(short.code).not.toBe(0);
    expect(short.stderr).toMatch(/^aegis: .*--idle-pause.*"500ms" is too short: at least 1s.*\[INVALID_ARGUMENT\]\n$/);
    expect(await codeOf(d.client.createInstance({ command: ['true'], idlePauseMs: 500 }))).toBe('INVALID_ARGUMENT');
    expect(await codeOf(d.client.createInstance({ command: ['true'], idlePauseMs: -1 }))).toBe('INVALID_ARGUMENT');
    expect(await codeOf(d.client.createInstance({ command: ['true'], idlePauseMs: 1.5 }))).toBe('INVALID_ARGUMENT');
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });
});

describe('AEGIS_IDLE_PAUSE', () => {
  it('gives instances created without idlePauseMs their idle time; an idle pause outlives an aegisd restart and is woken after it', async () => {
    const d = await ownDaemon({ AEGIS_IDLE_PAUSE: '2s' });
    const plain: Instance = await d.client.createInstance({ handle: 'dflt', command: ['sleep', '600'], network: 'none' });
    expect(plain.idlePauseMs).toBe(IDLE_MS);
    const never = await d.client.createInstance({ handle: 'never', command: ['sleep', '600'], network: 'none', idlePauseMs: 0 });
    expect(never.idlePauseMs).toBeUndefined();
    await untilIdlePaused(d, 'dflt');
    await d.stop();
    await d.start();
    const back = await d.client.getInstance('dflt');
    expect(back.state).toBe('paused');
    expect(back.idlePaused).toBe(true);
    expect((await d.cli(['exec', 'dflt', '--', 'echo', 'after-restart'])).stdout).toBe('after-restart\n');
    expect((await d.client.getInstance('dflt')).state).toBe('running');
    await untilIdlePaused(d, 'dflt'); // re-armed by the new daemon
    expect((await d.client.getInstance('never')).state).toBe('running');
  });

  it('a malformed value stops aegisd from starting, with the reason', async () => {
    const d = new TestDaemon(mkdtempSync('/tmp/aegis-it-'), { AEGIS_IDLE_PAUSE: 'later' });
    onTestFinished(() => teardown(d, false));
    const child = spawn(process.execPath, [path.join(ROOT, 'packages/daemon/dist/main.js')], { env: d.env });
    let err = '';
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const code = await new Promise((r) => child.on('close', r));
    expect(code).toBe(1);
    expect(err).toMatch(/AEGIS_IDLE_PAUSE="later" is not a duration/);
  });
});

describe('with the warm pool', () => {
  it('an instance taken from the pool idles and is woken like a booted one', async () => {
    const d = await ownDaemon({ AEGIS_POOL_SIZE: '1' });
    for (let i = 0; i < 1200 && (await d.client.status()).pool?.ready !== 1; i++) await sleep(100);
    expect((await d.client.status()).pool?.ready).toBe(1);
    await d.client.createInstance({ handle: 'pooled', command: ['sleep', '600'], idlePauseMs: IDLE_MS });
    expect(d.log()).toMatch(/instance pooled \(\w+\): from the warm pool/);
    await untilIdlePaused(d, 'pooled');
    expect((await d.cli(['exec', 'pooled', '--', 'echo', 'from-the-pool'])).stdout).toBe('from-the-pool\n');
    expect((await d.client.getInstance('pooled')).state).toBe('running');
  });
});
