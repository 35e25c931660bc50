/**
 * Checkpoints and forks on real VMs: a running machine saved whole and started again as new
 * instances whose processes carry on, each with its own identity, disk and ports.
 */
import { chmodSync, truncateSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { qemuProcessesFor, useDaemon, type TestDaemon } from './fixture.js';

const daemon = useDaemon();

/** A workload that counts, so a resumed copy shows it carried on rather than started again. */
const COUNTER = ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done'];

async function sh(d: TestDaemon, handle: string, script: string): Promise<string> {
  const r = await d.cli(['exec', handle, '--', 'sh', '-c', script]);
  expect(r.stderr, `${handle}: ${script}`).toBe('');
  expect(r.code, `${handle}: ${script}`).toBe(0);
  return r.stdout;
}

/** The counter now, and a moment later: it must have gone on from where it was. */
async function counting(d: TestDaemon, handle: string): Promise<[number, number]> {
  const [a, b] = (await sh(d, handle, 'cat /tmp/counter; sleep 1; cat /tmp/counter')).trim().split('\n').map(Number);
  return [a ?? NaN, b ?? NaN];
}

describe('snapshots and forks', () => {
  it('fork -n 3: each fork carries on counting from the fork point, with its own files, hostname and machine-id; the origin goes on', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'origin', command: COUNTER, network: 'none' });
    await sh(d, 'origin', 'echo from-origin > /root/data.txt; sync');
    const before = Number((await sh(d, 'origin', 'cat /tmp/counter')).trim());
    const originId = (await sh(d, 'origin', 'cat /etc/machine-id')).trim();

    const forked = await d.cli(['fork', 'origin', '-n', '3']);
    expect(forked.stderr).toBe('');
    const forks = forked.stdout.trim().split('\n');
    expect(forks).toHaveLength(3);

    const ids = new Set([originId]);
    for (const f of forks) {
      const [a, b] = await counting(d, f);
      expect(a).toBeGreaterThanOrEqual(before); // carried on, not started again at 1
      expect(b).toBeGreaterThan(a);
      expect(await sh(d, f, 'cat /root/data.txt; hostname')).toBe(`from-origin\n${f}\n`);
      ids.add((await sh(d, f, 'cat /etc/machine-id')).trim());
      await sh(d, f, `echo mine > /root/${f}.txt`);
    }
    expect(ids.size).toBe(4); // every fork its own identity
    // Writes are each one's own: no fork sees another's file, nor does the origin.
    for (const f of [...forks, 'origin']) {
      const seen = (await sh(d, f, 'ls /root')).trim().split('\n').sort();
      expect(seen).toEqual(['data.txt', ...(f === 'origin' ? [] : [`${f}.txt`])].sort());
    }
    const [oa, ob] = await counting(d, 'origin');
    expect(ob).toBeGreaterThan(oa);
    expect((await d.client.getInstance('origin')).state).toBe('running');

    // The forks' checkpoint: listed with its dependents, kept while they exist, gone with the last.
    const snaps = await d.client.listSnapshots();
    expect(snaps).toHaveLength(1);
    expect(snaps[0]).toMatchObject({ auto: true, source: { handle: 'origin' }, memoryMiB: 512 });
    expect([...(snaps[0]?.dependents ?? [])].sort()).toEqual([...forks].sort());
    const refused = await d.cli(['snapshot', 'rm', snaps[0]?.name ?? '']);
    expect([refused.code, refused.stderr]).toEqual([
      1,
      expect.stringMatching(/is the base of instances .*delete them first \[FAILED_PRECONDITION\]/),
    ]);
    for (const f of forks) await d.client.deleteInstance(f, { force: true });
    await expect.poll(() => d.client.listSnapshots(), { timeout: 10_000 }).toEqual([]);
    await d.client.deleteInstance('origin', { force: true });
  });

  it('snapshot create, then start it elsewhere after its instance is gone; its exposed port served again on a new host port; rm refused while used', async () => {
    const d = daemon();
    await d.client.createInstance({
      handle: 'web',
      command: ['sh', '-c', 'echo served-from-snapshot > /tmp/index.html; cd /tmp; python3 -m http.server 8000'],
      network: 'none',
      exposes: [{ guestPort: 8000 }],
    });
    const port = (await d.client.getInstance('web')).ports[0]?.hostPort;
    await expect
      .poll(
        () =>
          fetch(`http://127.0.0.1:${port}/index.html`).then(
            (r) => r.text(),
            () => '',
          ),
        { timeout: 60_000 },
      )
      .toBe('served-from-snapshot\n');
    const made = await d.cli(['snapshot', 'create', 'web', '--name', 'web-ready']);
    expect([made.code, made.stdout, made.stderr]).toEqual([0, 'web-ready\n', '']);
    const info = await d.client.getSnapshot('web-ready');
    expect(info).toMatchObject({ name: 'web-ready', auto: false, source: { handle: 'web' }, dependents: [] });
    expect(info.sizeBytes).toBeGreaterThan(1 << 20);
    await d.client.deleteInstance('web', { force: true });

    const started = await d.cli(['instance', 'start', '--snapshot', 'web-ready', '--name', 'web2']);
    expect([started.code, started.stdout, started.stderr]).toEqual([0, 'web2\n', '']);
    const web2 = await d.client.getInstance('web2');
    expect(web2).toMatchObject({ state: 'running', command: ['sh', '-c', expect.stringContaining('http.server') as unknown] });
    // The server process was not started again: it was running in the snapshot and carried on.
    const port2 = web2.ports[0]?.hostPort;
    expect(port2).toBeGreaterThan(0);
    expect(await fetch(`http://127.0.0.1:${port2}/index.html`).then((r) => r.text())).toBe('served-from-snapshot\n');
    expect(await sh(d, 'web2', 'hostname')).toBe('web2\n');

    const inUse = await d.cli(['snapshot', 'rm', 'web-ready']);
    expect(inUse.stderr).toBe('aegis: snapshot "web-ready" is the base of instance web2: delete it first [FAILED_PRECONDITION]\n');
    // What a snapshot's machine fixes cannot be given.
    const fixed = await d.cli(['instance', 'start', '--snapshot', 'web-ready', '-m', '1g']);
    expect(fixed.stderr).toMatch(/started from a snapshot .*memoryMiB cannot be given \[INVALID_ARGUMENT\]/);
    await d.client.deleteInstance('web2', { force: true });
    expect((await d.cli(['snapshot', 'rm', 'web-ready'])).code).toBe(0);
    expect(await d.client.listSnapshots()).toEqual([]);
  });

  it('a damaged or missing snapshot file: a clear error and nothing started from it', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'src', command: ['sleep', 'infinity'], network: 'none' });
    await d.client.createSnapshot('src', { name: 'good' });
    await d.client.deleteInstance('src', { force: true });
    const state = path.join(d.home, 'snapshots', 'good', 'state');
    chmodSync(state, 0o600);
    truncateSync(state, 4096);
    const damaged = await d.cli(['instance', 'start', '--snapshot', 'good']);
    expect(damaged.stderr).toMatch(
      /^aegis: snapshot "good" is damaged \(state is 4096 bytes, not \d+\); nothing was started from it \[FAILED_PRECONDITION\]\n$/,
    );
    const missing = await d.cli(['instance', 'start', '--snapshot', 'nope']);
    expect(missing.stderr).toBe('aegis: no snapshot "nope" (aegis snapshot ls lists them) [NOT_FOUND]\n');
    expect(await d.client.listInstances({ all: true })).toEqual([]);
    expect((await d.cli(['snapshot', 'rm', 'good'])).code).toBe(0);
  });
  it('hibernate: no VMM left, ports still bound; woken by exec, by a connection and after aegisd is SIGKILLed; files and a counting process carry on across cycles', async () => {
    const d = daemon();
    const cycles = Number(process.env['AEGIS_HIBERNATE_CYCLES'] ?? 6);
    await d.client.createInstance({
      handle: 'sleeper',
      command: ['sh', '-c', 'cd /tmp && echo awake > index.html && python3 -m http.server 8000 & ' + COUNTER[2]],
      network: 'none',
      exposes: [{ guestPort: 8000 }],
    });
    const { id, ports } = await d.client.getInstance('sleeper');
    const url = `http://127.0.0.1:${ports[0]?.hostPort ?? 0}/index.html`;
    await expect
      .poll(
        () =>
          fetch(url).then(
            (r) => r.text(),
            () => '',
          ),
        { timeout: 60_000 },
      )
      .toBe('awake\n');
    const machineId = await sh(d, 'sleeper', 'cat /etc/machine-id');
    let last = 0;
    const sums: string[] = [];
    for (let i = 0; i < cycles; i++) {
      const [n, sum] = (await sh(d, 'sleeper', `echo cycle-${i} >> /root/journal; sync; cat /tmp/counter; sha256sum /root/journal`))
        .trim()
        .split('\n');
      expect(Number(n)).toBeGreaterThanOrEqual(last); // never started again
      last = Number(n);
      sums.push(sum ?? '');
      expect((await d.cli(['hibernate', 'sleeper'])).stdout).toBe('sleeper\n');
      expect((await d.client.getInstance('sleeper')).state).toBe('hibernated');
      expect((await qemuProcessesFor(d.home)).filter((l) => l.includes(id))).toEqual([]);
      if (i === cycles - 1) {
        // aegisd killed while it sleeps: the next one finds it hibernated, its port bound again.
        await d.kill();
        await d.start();
        expect((await d.client.getInstance('sleeper')).state).toBe('hibernated');
      }
      // Woken by a connection to its port every other cycle, by an exec otherwise.
      if (i % 2 === 1) expect(await fetch(url).then((r) => r.text())).toBe('awake\n');
      const again = (await sh(d, 'sleeper', 'cat /tmp/counter; sha256sum /root/journal; cat /etc/machine-id')).trim().split('\n');
      expect(Number(again[0])).toBeGreaterThanOrEqual(last);
      expect(again[1]).toBe(sum);
      expect(`${again[2] ?? ''}\n`).toBe(machineId); // the same machine, not a clone
      expect((await d.client.getInstance('sleeper')).state).toBe('running');
    }
    expect(await sh(d, 'sleeper', 'cat /root/journal')).toBe(Array.from({ length: cycles }, (_, i) => `cycle-${i}\n`).join(''));
    expect(await fetch(url).then((r) => r.text())).toBe('awake\n');
    // Stopped where it lies; a delete of a hibernated one needs --force, as a running one's.
    await d.client.hibernateInstance('sleeper');
    const refused = await d.cli(['rm', 'sleeper']);
    expect(refused.stderr).toMatch(/is hibernated; stop it first or delete with --force \[FAILED_PRECONDITION\]/);
    expect((await d.client.stopInstance('sleeper')).state).toBe('stopped');
    expect((await d.cli(['wait', 'sleeper'])).stdout).toBe('137\n');
    await d.client.deleteInstance('sleeper');
  });
  it('--idle-hibernate: an unused instance hibernates by itself (after its idle pause, when it has one); the next exec wakes it', async () => {
    const d = daemon();
    const both = await d.cli([
      'instance',
      'start',
      '--name',
      'napper',
      '--network',
      'none',
      '--idle-pause',
      '2s',
      '--idle-hibernate',
      '6s',
      '--',
      'sleep',
      'infinity',
    ]);
    const alone = await d.cli([
      'instance',
      'start',
      '--name',
      'dozer',
      '--network',
      'none',
      '--idle-hibernate',
      '3s',
      '--',
      'sleep',
      'infinity',
    ]);
    expect([both.code, alone.code]).toEqual([0, 0]);
    await expect.poll(async () => (await d.client.getInstance('napper')).state, { timeout: 30_000, interval: 250 }).toBe('paused');
    await expect.poll(async () => (await d.client.getInstance('napper')).state, { timeout: 60_000, interval: 500 }).toBe('hibernated');
    await expect.poll(async () => (await d.client.getInstance('dozer')).state, { timeout: 60_000, interval: 500 }).toBe('hibernated');
    expect((await d.client.getInstance('dozer')).stateReason).toBe('unused for 3s');
    expect(await sh(d, 'dozer', 'echo awake')).toBe('awake\n');
    expect((await d.client.getInstance('dozer')).state).toBe('running');
    const bad = await d.cli(['instance', 'start', '--idle-pause', '5s', '--idle-hibernate', '5s', '--', 'true']);
    expect(bad.stderr).toBe('aegis: idleHibernateMs must be longer than idlePauseMs: paused first, hibernated later [INVALID_ARGUMENT]\n');
    for (const h of ['napper', 'dozer']) await d.client.deleteInstance(h, { force: true });
  });
});
