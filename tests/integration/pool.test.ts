/**
 * The warm pool (issue 14): paused VMs, warmed up, that `run` takes instead of booting. Each
 * one taken must be its own machine, show nothing of its warm-up, and get env and secrets
 * only with its workload; the pool refills, follows a change of the guest's artifacts, and
 * can be turned off. Also here: `run` returns at the workload's exit while the teardown
 * finishes behind it, even across an aegisd that dies in between.
 */
import { copyFileSync, mkdtempSync, readdirSync, rmSync, symlinkSync, renameSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { Status } from '@aegis/client';
import { artifacts, qemuProcessesFor, TestDaemon, teardown, until, useDaemon } from './fixture.js';

async function pool(d: TestDaemon): Promise<NonNullable<Status['pool']>> {
  const s = await d.client.status();
  if (!s.pool) throw new Error('no pool in status');
  return s.pool;
}

const PROBE = [
  'sh',
  '-c',
  'cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; cat /proc/sys/kernel/hostname; date +%s; echo "$GREETING"; ps -eo args | grep -v -e "^\\[" -e "ps -eo" -e grep -e "^COMMAND" -e "^sh -c"; ls -A /tmp',
];

describe('the warm pool', () => {
  // Templates of its own: one test changes the guest's artifacts under the daemon.
  const templates = mkdtempSync('/tmp/aegis-templates-');
  const work = mkdtempSync('/tmp/aegis-pool-');
  // The rootfs through a symlink of our own, so the test can give the daemon another one.
  const rootfsLink = path.join(work, 'rootfs.erofs');
  symlinkSync(artifacts().rootfs, rootfsLink);
  // Registered before the daemon's own: after-hooks run in reverse, so these directories go
  // once the daemon has stopped (it may still be building a template into them until then).
  afterAll(() => {
    rmSync(templates, { recursive: true, force: true });
    rmSync(work, { recursive: true, force: true });
  });
  const daemon = useDaemon({ AEGIS_TEMPLATES: templates, AEGIS_POOL_SIZE: '1', AEGIS_ROOTFS: rootfsLink });

  it('gives each run a ready VM, refills behind it, and each one is its own machine with nothing of its warm-up', async () => {
    const d = daemon();
    await until(async () => (await pool(d)).ready === 1, 120_000, 'a ready VM in the pool');
    const p0 = await pool(d);
    expect(p0).toMatchObject({ size: 1, ready: 1, taken: 0 });
    expect(p0.shapes).toEqual([expect.objectContaining({ default: true, ready: 1, memoryMiB: 512, vcpuCount: 1, image: false })]);
    expect((await d.cli(['status'])).stdout).toMatch(/^pool: +1 ready \(1\/1 default 512 MiB 1 vCPU \w+\); 0 taken, 0 missed/m);
    const doctor = JSON.parse((await d.cli(['doctor', '--json'])).stdout) as { name: string; status: string; detail: string }[];
    expect(doctor.find((c) => c.name === 'warm pool')).toMatchObject({ status: 'ok', detail: expect.stringMatching(/^1 VM\(s\) ready/) });
    await d.cli(['secret', 'set', 'GREETING', 'hello from a secret']);

    const a = await d.cli(['run', '--name', 'pool-a', '--secret', 'GREETING', '--', ...PROBE]);
    expect(a.stderr).toBe('');
    expect(a.code).toBe(0);
    expect(d.log()).toMatch(/instance pool-a \(\w+\): from the warm pool/);
    expect((await pool(d)).taken).toBe(1);
    await until(async () => (await pool(d)).ready === 1, 60_000, 'the pool to refill');
    const b = await d.cli(['run', '--name', 'pool-b', '--env', 'GREETING=hello from env', '--', ...PROBE]);
    expect(b.code).toBe(0);
    expect(d.log()).toMatch(/instance pool-b \(\w+\): from the warm pool/);

    const [idA, randA, hostA, timeA, greetA, ...restA] = a.stdout.trim().split('\n');
    const [idB, randB, hostB, timeB, greetB, ...restB] = b.stdout.trim().split('\n');
    expect(idA).toMatch(/^[0-9a-f]{32}$/);
    expect(idB).toMatch(/^[0-9a-f]{32}$/);
    expect(idA).not.toBe(idB);
    expect(randA).toMatch(/^[0-9a-f]{32}$/);
    expect(randA).not.toBe(randB);
    expect([hostA, hostB]).toEqual(['pool-a', 'pool-b']);
    for (const t of [timeA, timeB]) expect(Math.abs(Number(t) - Date.now() / 1000)).toBeLessThan(30);
    // Env and secrets come with the workload, and only with it.
    expect([greetA, greetB]).toEqual(['hello from a secret', 'hello from env']);
    // Nothing left of the warm-up: no process but the harness's own, no file in /tmp, no output.
    for (const rest of [restA, restB]) {
      expect(rest.filter((l) => !/^\/aegis\/|^node |harness|aegis-init/.test(l))).toEqual([]);
    }
    // Both were throwaway `run`s: removed behind them.
    await until(async () => (await d.client.listInstances({ all: true })).length === 0, 20_000, 'both runs to be removed');
    expect(a.stdout + b.stdout).not.toMatch(/warm/);
  });

  it('an instance started from the pool serves exec, files and an exposed port like any other', async () => {
    const d = daemon();
    await until(async () => (await pool(d)).ready === 1, 60_000, 'a ready VM in the pool');
    const inst = await d.client.createInstance({
      handle: 'pool-svc',
      command: ['python3', '-m', 'http.server', '--bind', '127.0.0.1', '8080', '--directory', '/root'],
      exposes: [{ guestPort: 8080 }],
    });
    expect(d.log()).toMatch(/instance pool-svc \(\w+\): from the warm pool/);
    expect((await d.cli(['exec', 'pool-svc', '--', 'sh', '-c', 'echo served > /root/index.html; cat /root/index.html'])).stdout).toBe(
      'served\n',
    );
    const port = inst.ports[0]?.hostPort;
    let body = '';
    await until(
      async () => {
        body = await fetch(`http://127.0.0.1:${port}/index.html`).then(
          (r) => r.text(),
          () => '',
        );
        return body === 'served\n';
      },
      60_000,
      'the exposed port to answer',
    );
    expect(body).toBe('served\n');
    const out = path.join(work, 'copied');
    expect((await d.cli(['cp', 'pool-svc:/root/index.html', out])).code).toBe(0);
    await d.client.deleteInstance('pool-svc', { force: true });
  });

  it('follows a change of the guest artifacts: VMs of the old shape are ended, the new shape is pooled', async () => {
    const d = daemon();
    await until(async () => (await pool(d)).ready === 1, 60_000, 'a ready VM in the pool');
    const before = await qemuProcessesFor(d.home);
    expect(before.length).toBe(1); // the one pooled VM
    // A new rootfs (a copy: another file), as `make all` would leave after a harness change.
    const copy = path.join(work, 'rootfs-2.erofs');
    copyFileSync(artifacts().rootfs, copy);
    symlinkSync(copy, `${rootfsLink}.new`);
    renameSync(`${rootfsLink}.new`, rootfsLink);
    // The first run after the change finds nothing of its shape ready (it boots), and makes
    // the pool notice: the old VM goes, a template for the new artifacts is built, then a VM.
    const r = await d.cli(['run', '--name', 'after-change', '--', 'true']);
    expect(r.code).toBe(0);
    expect(d.log()).not.toMatch(/instance after-change \(\w+\): from the warm pool/);
    await until(async () => (await qemuProcessesFor(d.home)).every((l) => !before.includes(l)), 30_000, 'the old pooled VM to end');
    await until(async () => (await pool(d)).ready === 1, 180_000, 'a VM of the new shape');
    expect((await qemuProcessesFor(d.home)).every((l) => l.includes('rootfs-2.erofs'))).toBe(true);
    const again = await d.cli(['run', '--name', 'new-shape', '--', 'echo', 'new']);
    expect(again.stdout).toBe('new\n');
    expect(d.log()).toMatch(/instance new-shape \(\w+\): from the warm pool/);
  });

  it('never hands out a VM made from a template that was replaced meanwhile', async () => {
    const d = daemon();
    await until(async () => (await pool(d)).ready === 1, 180_000, 'a ready VM in the pool');
    const pooledBefore = await qemuProcessesFor(d.home);
    // The current build is set aside, as after a failed restore: a new one will be built.
    for (const n of readdirSync(templates).filter((n) => n.endsWith('.current'))) rmSync(path.join(templates, n));
    const r = await d.cli(['run', '--name', 'after-rebuild', '--', 'echo', 'fine']);
    expect(r.stdout).toBe('fine\n');
    expect(d.log()).not.toMatch(/instance after-rebuild \(\w+\): from the warm pool/);
    await until(async () => (await qemuProcessesFor(d.home)).every((l) => !pooledBefore.includes(l)), 30_000, 'the stale VM to end');
    await until(async () => (await pool(d)).ready === 1, 180_000, 'a VM from the new template');
    await d.cli(['run', '--name', 'rebuilt', '--', 'true']);
    expect(d.log()).toMatch(/instance rebuilt \(\w+\): from the warm pool/);
  });

  it('ends its VMs when aegisd stops', async () => {
    const d = daemon();
    await until(async () => (await pool(d)).ready === 1, 180_000, 'a ready VM in the pool');
    await d.stop();
    await until(async () => (await qemuProcessesFor(d.home)).length === 0, 10_000, 'pooled VMs to end with aegisd');
    await d.start();
  });
});

describe('with the pool off', () => {
  const daemon = useDaemon({ AEGIS_POOL_SIZE: '0' });

  it('has no pool, starts no VM of its own, and runs as before', async () => {
    const d = daemon();
    expect((await d.client.status()).pool).toBeUndefined();
    expect((await d.cli(['status'])).stdout).toMatch(/pool: +off/);
    expect((await d.cli(['run', '--', 'echo', 'no pool'])).stdout).toBe('no pool\n');
    expect(d.log()).not.toMatch(/warm pool/);
    // The run's own VM ends behind it; then no VM is left.
    await until(async () => (await qemuProcessesFor(d.home)).length === 0, 20_000, 'no VM at all');
  });

  it('refuses a pool size that is not a number', async () => {
    const bad = new TestDaemon(mkdtempSync('/tmp/aegis-it-'), { AEGIS_POOL_SIZE: 'lots' });
    await expect(bad.start()).rejects.toThrow();
    expect(bad.log()).toMatch(/AEGIS_POOL_SIZE must be a whole number/);
    await teardown(bad, false);
  });
});

describe('run returns at the workload exit', () => {
  const daemon = useDaemon({ AEGIS_POOL_SIZE: '0' });

  it('with its status and all its output, while the VM is torn down behind it', async () => {
    const d = daemon();
    // The workload leaves a process that ignores SIGTERM: the VM takes a while to power off.
    const r = await d.cli(['run', '--name', 'early', '--', 'sh', '-c', 'seq 1 3000; (trap "" TERM; sleep 600) & exit 7']);
    expect(r.code).toBe(7);
    expect(r.stdout.split('\n').length).toBe(3001);
    // Still there when run returned; gone shortly after, with its VM.
    expect((await d.client.listInstances({ all: true })).map((i) => `${i.handle} ${i.state}`)).toEqual(['early stopping']);
    await until(async () => (await d.client.listInstances({ all: true })).length === 0, 20_000, 'the instance to be removed');
    await until(async () => (await qemuProcessesFor(d.home)).length === 0, 10_000, 'its VM to end');
  });

  it('a run right after one holding the same name, host port or volume waits for it to go, as with Docker', async () => {
    const d = daemon();
    const port = await new Promise<number>((resolve) => {
      const srv = net.createServer().listen(0, '127.0.0.1', () => {
        const p = (srv.address() as net.AddressInfo).port;
        srv.close(() => resolve(p));
      });
    });
    // The workload leaves a process that ignores SIGTERM: its VM is still going when run returns.
    const slowExit = ['sh', '-c', '(trap "" TERM; sleep 600) & echo done'];
    for (let i = 0; i < 2; i++) {
      const r = await d.cli(['run', '--name', 'same', '-p', `127.0.0.1:${port}:8080`, '--', ...slowExit]);
      expect(r.stderr).toBe('');
      expect(r.stdout).toBe('done\n');
    }
    for (let i = 0; i < 2; i++) {
      // With a volume, run returns once the VM stopped: the volume is free (and flushed) then.
      expect((await d.cli(['run', '-v', 'vol:/v', '--', 'sh', '-c', `echo ${i} >> /v/n; cat /v/n`])).stdout).toBe(
        i === 0 ? '0\n' : '0\n1\n',
      );
      const volumes = JSON.parse((await d.cli(['volume', 'ls', '--json'])).stdout) as { usedBy: unknown[] }[];
      expect(volumes.map((v) => v.usedBy)).toEqual([[]]);
    }
  });

  it('and the removal still happens when aegisd dies before it', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--name', 'orphan', '--', 'sh', '-c', '(trap "" TERM; sleep 600) & exit 3']);
    expect(r.code).toBe(3);
    await d.kill();
    expect(d.instanceDirs().length).toBe(1);
    await d.start();
    await until(async () => (await d.client.listInstances({ all: true })).length === 0, 30_000, 'the instance to be removed');
    await until(async () => (await qemuProcessesFor(d.home)).length === 0, 15_000, 'its VM to end');
    expect(d.instanceDirs()).toEqual([]);
  });
});
