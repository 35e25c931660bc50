import { describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import type { Probe } from '@aegis/vmm';
import { accelerationCheck, backendChecks, daemonCheck, formatChecks } from './doctor.js';

const usable: Probe = { available: true, detail: 'found' };
const unusable: Probe = { available: false, detail: 'not found' };

describe('aegis doctor', () => {
  it('marks a usable backend ok and an unusable one warn while another is usable', () => {
    const checks = backendChecks([
      { name: 'qemu', probe: usable },
      { name: 'firecracker', probe: unusable },
    ]);
    expect(checks.map((c) => [c.name, c.status])).toEqual([
      ['backend qemu', 'ok'],
      ['backend firecracker', 'warn'],
    ]);
    expect(checks[1]?.detail).toBe('not usable here: not found');
  });

  it('marks the default backend missing when no backend is usable', () => {
    const checks = backendChecks([
      { name: 'qemu', probe: unusable },
      { name: 'firecracker', probe: unusable },
    ]);
    expect(checks.map((c) => c.status)).toEqual(['missing', 'warn']);
  });

  it('marks the backend AEGIS_BACKEND names missing when it is unusable, whatever else is', () => {
    const checks = backendChecks(
      [
        { name: 'qemu', probe: usable },
        { name: 'firecracker', probe: unusable },
      ],
      'firecracker',
    );
    expect(checks.map((c) => c.status)).toEqual(['ok', 'missing']);
  });

  it('marks KVM ok and TCG warn, keeping the reason', () => {
    const kvm = accelerationCheck({ ...usable, accelerationReason: 'KVM', capabilities: { acceleration: 'kvm' } as Probe['capabilities'] });
    expect(kvm).toEqual({ name: 'acceleration', status: 'ok', detail: 'KVM' });
    const tcg = accelerationCheck({ ...usable, accelerationReason: 'TCG (software emulation): /dev/kvm is missing' });
    expect(tcg.status).toBe('warn');
    expect(tcg.detail).toMatch(/^TCG \(software emulation\): \/dev\/kvm is missing/);
  });

  it('marks a daemon that is not running warn, and one that answers with an error missing', () => {
    expect(daemonCheck({ pid: 7, backend: 'qemu' })).toEqual({ name: 'aegisd', status: 'ok', detail: 'running (pid 7), backend qemu' });
    expect(daemonCheck(new AegisError('UNAVAILABLE', 'no socket')).status).toBe('warn');
    const broken = daemonCheck(new AegisError('INTERNAL', 'boom'));
    expect(broken).toEqual({ name: 'aegisd', status: 'missing', detail: 'not answering: boom' });
  });

  it('prints one line per check: status, name, detail', () => {
    const text = formatChecks([
      { name: 'backend qemu', status: 'ok', detail: 'QEMU 7.2' },
      { name: 'guest kernel', status: 'missing', detail: '/x missing; build it with: make kernel' },
    ]);
    expect(text).toBe('ok      backend qemu         QEMU 7.2\nmissing guest kernel         /x missing; build it with: make kernel\n');
  });
});
