/**
 * The KVM smoke suite (issue 25): what must work where users have KVM, run with a real /dev/kvm.
 * On our machines that is inside the nested-KVM VM nested.test.ts boots (L1, itself under TCG);
 * on a host with a KVM that runs our guest it can run as it is (`AEGIS_KVM_INNER=1 npx vitest
 * run --project kvm-inner`). Nothing here forces KVM: the daemon's own test boot must choose it,
 * and the first case fails if it did not.
 */
import { mkdtempSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { qemuProcessesFor, useDaemon, type TestDaemon } from '../integration/fixture.js';

// Under nested KVM a boot takes 7–40 s where the daemon's KVM test allows 5 by default
// (../../docs/platforms.md); the deadline is the daemon's setting, raised here. Templates of
// its own: those this host built under TCG are no use under KVM (and slow to find so).
const ENV = { AEGIS_KVM_TEST_TIMEOUT_MS: '120000', AEGIS_TEMPLATES: mkdtempSync('/tmp/aegis-kvm-templates-') };
/** What one `aegis` command may take here: a cold boot under nested KVM on a loaded host. */
const CLI_MS = 300_000;

async function sh(d: TestDaemon, ref: string, script: string): Promise<string> {
  const r = await d.cli(['exec', ref, '--', 'sh', '-c', script], { timeoutMs: CLI_MS });
  if (r.code !== 0) throw new Error(`exec ${script} in ${ref}: exit ${r.code}: ${r.stderr}`);
  return r.stdout;
}

async function settled(d: TestDaemon): Promise<{ acceleration: string; accelerationReason: string }> {
  for (let i = 0; i < 1200; i++) {
    const { backend } = await d.client.status();
    if (!/being tested/.test(backend.accelerationReason)) return backend;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the KVM test never settled:\n${d.log()}`);
}

const COUNTER = ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done'];

describe('with a real /dev/kvm', () => {
  const daemon = useDaemon(ENV);

  it('the daemon tests KVM, finds it runs the guest, and chooses it', async () => {
    const d = daemon();
    const s = await settled(d);
    expect(s.acceleration, s.accelerationReason).toBe('kvm');
    console.log(`accelerator: ${s.acceleration} (${s.accelerationReason})`);
  });

  it('aegis run -- echo hello: cold, then from the snapshot template once it is built', async () => {
    const d = daemon();
    await settled(d);
    const cold = await d.cli(['run', '--name', 'first', '--', 'echo', 'hello'], { timeoutMs: CLI_MS });
    expect(cold.stderr, d.log()).toBe('');
    expect(cold).toMatchObject({ code: 0, stdout: 'hello\n' });
    for (let i = 0; i < 1800 && !/template \w+: ready/.test(d.log()); i++) await new Promise((r) => setTimeout(r, 100));
    expect(d.log()).toMatch(/template \w+: ready/);
    const warm = await d.cli(['run', '--name', 'restored', '--', 'sh', '-c', 'echo hello from $(hostname)'], { timeoutMs: CLI_MS });
    expect(warm).toMatchObject({ code: 0, stdout: 'hello from restored\n' });
    expect(d.log()).toMatch(/restored \(\w+\): (warm boot|from the warm pool)/);
  });

  it('exec, stop and a VM killed under a running instance (noticed, failed with the reason)', async () => {
    const d = daemon();
    await settled(d);
    await d.client.createInstance({ handle: 'svc', command: ['sleep', '600'] });
    expect(await sh(d, 'svc', 'echo $((6*7)); grep -c processor /proc/cpuinfo')).toMatch(/^42\n\d+\n$/);
    expect((await d.client.stopInstance('svc', { timeoutMs: 5000 })).state).toBe('stopped');

    await d.client.createInstance({ handle: 'doomed', command: ['sleep', '600'] });
    // Every VMM of this daemon (a pooled VM keeps the name it was started under, so which one is
    // doomed's cannot be told from its command line): the pool's too, which it must replace.
    const pids = (await qemuProcessesFor(d.home)).map((l) => Number(l.trim().split(/\s+/)[0]));
    expect(pids.length).toBeGreaterThan(0);
    for (const pid of pids) process.kill(pid, 'SIGKILL');
    let inst = await d.client.getInstance('doomed');
    for (let i = 0; i < 100 && inst.state === 'running'; i++) {
      await new Promise((r) => setTimeout(r, 100));
      inst = await d.client.getInstance('doomed');
    }
    expect(inst.state).toBe('failed');
    expect(inst.stateReason).toMatch(/VM ended unexpectedly/);
  });
});

describe('with a real /dev/kvm, the warm pool', () => {
  const daemon = useDaemon({ ...ENV, AEGIS_POOL_SIZE: '1' });

  it('the warm pool fills under KVM and serves an instance', async () => {
    const d = daemon();
    await settled(d);
    for (let i = 0; i < 1800 && !/warm pool: VM \w+ ready/.test(d.log()); i++) await new Promise((r) => setTimeout(r, 100));
    expect(d.log()).toMatch(/warm pool: VM \w+ ready/);
    const r = await d.cli(['run', '--name', 'pooled', '--', 'cat', '/proc/sys/kernel/hostname'], { timeoutMs: CLI_MS });
    expect(r).toMatchObject({ code: 0, stdout: 'pooled\n' });
    expect(d.log()).toMatch(/pooled \(\w+\): from the warm pool/);
  });
});

// Last: under our nested setup this is where L1's own kernel once crashed (in kvm_amd's
// __svm_vcpu_run, a stack overrun under TCG's SVM), which ends the whole run.
describe('with a real /dev/kvm, checkpoints', () => {
  const daemon = useDaemon(ENV);

  it('checkpoint and fork: the fork carries on from the fork point; hibernate and wake', async () => {
    const d = daemon();
    await settled(d);
    await d.client.createInstance({ handle: 'origin', command: COUNTER, network: 'none' });
    await new Promise((r) => setTimeout(r, 1000));
    const before = Number((await sh(d, 'origin', 'cat /tmp/counter')).trim());
    const forked = await d.cli(['fork', 'origin'], { timeoutMs: CLI_MS });
    expect(forked.stderr).toBe('');
    const [fork] = forked.stdout.trim().split('\n');
    expect(fork).toBeTruthy();
    const a = Number((await sh(d, fork!, 'cat /tmp/counter')).trim());
    expect(a).toBeGreaterThanOrEqual(before);
    expect(await sh(d, fork!, 'hostname')).toBe(`${fork}\n`);

    expect((await d.client.hibernateInstance('origin')).state).toBe('hibernated');
    const woke = Number((await sh(d, 'origin', 'cat /tmp/counter')).trim());
    expect(woke).toBeGreaterThanOrEqual(before);
  });
});
