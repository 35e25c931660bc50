import { describe, expect, it } from 'vitest';
import { restoreMismatch, type MachineRecord } from './machine.js';

const saved: MachineRecord = {
  kernelPath: '/k',
  rootfsPath: '/r',
  memoryMiB: 512,
  vcpuCount: 1,
  scratchDiskMiB: 4096,
  network: 'none',
  kernelArgs: [],
  volumes: [],
  ramInFile: false,
  backend: 'qemu',
  vmmVersion: 'QEMU 7.2.15',
  acceleration: 'tcg',
  cpu: 'max,erms=off',
};
const here = { backend: 'qemu', vmmVersion: 'QEMU 7.2.15', acceleration: 'tcg', cpu: 'max,erms=off' };

describe('restoreMismatch', () => {
  it('restores only under the same backend, accelerator, VMM version and CPU, and says which differs', () => {
    expect(restoreMismatch(saved, here)).toBeUndefined();
    expect(restoreMismatch(saved, { ...here, backend: 'firecracker' })).toMatch(/saved by the qemu backend, this daemon runs firecracker/);
    expect(restoreMismatch(saved, { ...here, acceleration: 'kvm' })).toMatch(/saved under tcg, this daemon runs kvm/);
    expect(restoreMismatch(saved, { ...here, vmmVersion: 'QEMU 8.2.2' })).toMatch(/saved by QEMU 7.2.15, this host has QEMU 8.2.2/);
    expect(restoreMismatch(saved, { ...here, cpu: 'host:0123456789abcdef' })).toMatch(
      /saved on a CPU the guest saw as max,erms=off, this host gives host:0123456789abcdef/,
    );
    // A record from before the CPU was kept cannot be vouched for.
    const older: MachineRecord = { ...saved };
    delete older.cpu;
    expect(restoreMismatch(older, here)).toMatch(/as unrecorded/);
  });
});
