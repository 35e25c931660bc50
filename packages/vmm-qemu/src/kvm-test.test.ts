/**
 * The KVM verdict against stand-in QEMU binaries (shell scripts that behave as QEMU did on
 * the hosts we met): a kernel that boots, an abort on an MSR, a guest that spins silently.
 * The real thing runs in the integration suite, on whatever /dev/kvm the machine has.
 */
import { chmodSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { QemuBackend } from './backend.js';
import { testKvmBoot } from './kvm-test.js';

let dir = '';
beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-kvm-unit-'));
});
afterEach(() => {
  rmSync(dir, { recursive: true, force: true });
  delete process.env['AEGIS_ACCEL'];
});

/** A stand-in `qemu-system-x86_64`: answers --version, counts its boots, then runs `body`. */
function standIn(body: string): string {
  const file = path.join(dir, 'qemu');
  writeFileSync(
    file,
    `#!/bin/sh
if [ "$1" = "--version" ]; then echo "QEMU emulator version 7.2.0 (stand-in)"; exit 0; fi
echo boot >> ${dir}/boots
${body}
`,
  );
  chmodSync(file, 0o755);
  return file;
}

const boots = (): number => readFileSync(path.join(dir, 'boots'), 'utf8').split('\n').filter(Boolean).length;

const PANIC = `echo '[    0.300000] VFS: Cannot open root device "vda" or unknown-block(0,0): error -6'
echo '[    0.310000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)'`;
const MSR_ABORT = `echo 'qemu-system-x86_64: error: failed to set MSR 0x10a to 0x69' >&2
echo "qemu-system-x86_64: ../../target/i386/kvm/kvm.c:3183: kvm_buf_set_msrs: Assertion 'ret == cpu->kvm_msr_buf->nmsrs' failed." >&2
kill -ABRT $$`;

function options(binary: string, deadlineMs = 3000): Parameters<typeof testKvmBoot>[0] {
  return { binary, machine: 'microvm', console: 'ttyS0', kernelPath: '/nonexistent/vmlinux', deadlineMs };
}

describe('the KVM test boot', () => {
  it('calls KVM usable when the guest kernel reaches the root mount', async () => {
    const v = await testKvmBoot(options(standIn(PANIC)));
    expect(v.usable).toBe(true);
    expect(v.detail).toMatch(/booted under KVM in \d+ ms/);
  });

  it('calls KVM unusable with QEMU’s own words when QEMU aborts on an MSR (a kvm-pvm host)', async () => {
    const v = await testKvmBoot(options(standIn(MSR_ABORT)));
    expect(v.usable).toBe(false);
    expect(v.detail).toContain('failed to set MSR 0x10a');
  });

  it('calls KVM unusable when QEMU reports a KVM internal error', async () => {
    const v = await testKvmBoot(
      options(standIn(`echo 'KVM internal error. Suberror: 1' >&2; echo 'RAX=0000000000000000 RBX=0' >&2; sleep 30`)),
    );
    expect(v.usable).toBe(false);
    expect(v.detail).toMatch(/KVM internal error/);
    expect(v.detail).not.toMatch(/RAX=/);
  });

  it('gives up on a guest that shows no sign of life by the deadline, and leaves no process behind', async () => {
    const started = Date.now();
    const v = await testKvmBoot(options(standIn('exec sleep 30'), 500));
    expect(v.usable).toBe(false);
    expect(v.detail).toMatch(/no sign of life within 500 ms/);
    expect(Date.now() - started).toBeLessThan(3000);
  });

  it('calls KVM unusable when QEMU exits without the guest kernel printing anything', async () => {
    const v = await testKvmBoot(options(standIn(`echo 'failed to initialize kvm: Inappropriate ioctl for device' >&2; exit 1`)));
    expect(v.usable).toBe(false);
    expect(v.detail).toContain('Inappropriate ioctl for device');
  });
});

describe('the QEMU backend’s accelerator', () => {
  function backend(binary: string): QemuBackend {
    const kernelPath = path.join(dir, 'vmlinux');
    const kvmDevice = path.join(dir, 'kvm');
    // Written once: a new mtime is a new kernel, which is tested again.
    if (!existsSync(kernelPath)) writeFileSync(kernelPath, 'kernel');
    if (!existsSync(kvmDevice)) writeFileSync(kvmDevice, '');
    return new QemuBackend({ binary, kernelPath, cacheDir: dir, kvmDevice });
  }

  it('boots under TCG until the verdict exists, then uses KVM, and asks the cache afterwards', async () => {
    const binary = standIn(PANIC);
    const first = await backend(binary).probe();
    expect(first.capabilities?.acceleration).toBe('tcg');
    expect(first.accelerationReason).toMatch(/being tested/);
    const settled = await first.settled;
    expect(settled?.capabilities?.acceleration).toBe('kvm');
    expect(settled?.accelerationReason).toMatch(/^KVM \(tested: /);
    // A new daemon with the same host, QEMU, kernel and device: no test boot.
    const again = await backend(binary).probe();
    expect(again.settled).toBeUndefined();
    expect(again.capabilities?.acceleration).toBe('kvm');
    expect(boots()).toBe(1);
  });

  it('says in one line why a /dev/kvm that cannot run the guest is not used', async () => {
    const settled = await (await backend(standIn(MSR_ABORT)).probe()).settled;
    expect(settled?.capabilities?.acceleration).toBe('tcg');
    expect(settled?.accelerationReason).toMatch(/present but it cannot run the guest: .*failed to set MSR 0x10a.*; using TCG$/);
    expect(settled?.accelerationReason).not.toContain('\n');
  });

  it('tests again when the guest kernel changes', async () => {
    const binary = standIn(PANIC);
    await (
      await backend(binary).probe()
    ).settled;
    writeFileSync(path.join(dir, 'vmlinux'), 'another kernel, another size');
    const p = await backend(binary).probe();
    expect(p.settled).toBeDefined();
    await p.settled;
    expect(boots()).toBe(2);
  });

  it('honours AEGIS_ACCEL=tcg and AEGIS_ACCEL=kvm without a test boot', async () => {
    const binary = standIn(PANIC);
    process.env['AEGIS_ACCEL'] = 'tcg';
    const tcg = await backend(binary).probe();
    expect(tcg.capabilities?.acceleration).toBe('tcg');
    expect(tcg.accelerationReason).toContain('AEGIS_ACCEL=tcg');
    process.env['AEGIS_ACCEL'] = 'kvm';
    const kvm = await backend(binary).probe();
    expect(kvm.capabilities?.acceleration).toBe('kvm');
    expect(kvm.settled).toBeUndefined();
    expect(() => boots()).toThrow(); // never booted
  });

  it('uses TCG without a test when the device is missing', async () => {
    const b = new QemuBackend({
      binary: standIn(PANIC),
      kernelPath: path.join(dir, 'k'),
      cacheDir: dir,
      kvmDevice: path.join(dir, 'nope'),
    });
    const p = await b.probe();
    expect(p.capabilities?.acceleration).toBe('tcg');
    expect(p.accelerationReason).toMatch(/is missing/);
    expect(p.settled).toBeUndefined();
  });
});
