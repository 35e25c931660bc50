/**
 * Acceleration is tested, not assumed: on a host whose /dev/kvm opens but cannot run the guest,
 * and on one with no /dev/kvm at all, instances boot (under TCG) and the daemon says why. The
 * daemon runs in a private mount namespace with a /dev of its own (tests/support/fake-kvm.sh);
 * the rest of the suite runs against whatever /dev/kvm this machine really has (on ours, a
 * kvm-pvm device that aborts QEMU on an MSR).
 */
import { describe, expect, it } from 'vitest';
import path from 'node:path';
import { ROOT, useDaemon, type TestDaemon } from './fixture.js';

const launcher = [path.join(ROOT, 'tests/support/fake-kvm.sh')];

/** The daemon's accelerator once its KVM test (if any) has settled. */
async function settledStatus(d: TestDaemon): Promise<{ acceleration: string; accelerationReason: string }> {
  for (let i = 0; i < 100; i++) {
    const { backend } = await d.client.status();
    if (!/being tested/.test(backend.accelerationReason)) return backend;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`the KVM test never settled:\n${d.log()}`);
}

describe('a /dev/kvm that opens but is not KVM (/dev/null in its place)', () => {
  const daemon = useDaemon({ AEGIS_FAKE_KVM: 'null' }, launcher);

  it('runs instances under TCG and names the reason in status and doctor', async () => {
    const d = daemon();
    const run = await d.cli(['run', '--', 'echo', 'hello']);
    expect(run.stderr).toBe('');
    expect(run.stdout).toBe('hello\n');
    expect(run.code).toBe(0);
    const s = await settledStatus(d);
    expect(s.acceleration).toBe('tcg');
    expect(s.accelerationReason).toMatch(/^\/dev\/kvm present but it cannot run the guest: .*Inappropriate ioctl for device.*; using TCG$/);
    const status = await d.cli(['status']);
    expect(status.stdout).toMatch(/accel: +\/dev\/kvm present but it cannot run the guest/);
  });

  it('doctor, run where the daemon runs, says the same in one line', async () => {
    const d = daemon();
    const { execFile } = await import('node:child_process');
    const out = await new Promise<string>((resolve) =>
      execFile(launcher[0] ?? '', [path.join(ROOT, 'bin/aegis'), 'doctor'], { env: d.env }, (_e, stdout) => resolve(stdout)),
    );
    const line = out.split('\n').find((l) => /acceleration/.test(l));
    expect(line).toMatch(/\/dev\/kvm present but it cannot run the guest: .*Inappropriate ioctl for device.*; using TCG/);
  });
});

describe('a host without /dev/kvm', () => {
  const daemon = useDaemon({ AEGIS_FAKE_KVM: 'absent' }, launcher);

  it('runs instances under TCG without testing anything, and says the device is missing', async () => {
    const d = daemon();
    const run = await d.cli(['run', '--', 'echo', 'hello']);
    expect(run.stdout).toBe('hello\n');
    const { backend } = await d.client.status();
    expect(backend.acceleration).toBe('tcg');
    expect(backend.accelerationReason).toBe('TCG (software emulation): /dev/kvm is missing');
  });
});
