/**
 * How the KVM test boot reads Firecracker's output: which lines decide, and what a failure
 * reports. The whole boot, against a stand-in binary, is tested in backend.test.ts.
 */
import { describe, expect, it } from 'vitest';
import { BootOutput, firecrackerLogLine } from './kvm-test.js';

const fc = (thread: string, level: string, message: string): string =>
  `2025-01-01T00:00:00.000000000 [aegis-kvm-probe:${thread}:${level}] ${message}\n`;

describe('BootOutput', () => {
  it('takes the guest reaching its init as proof, even when the line arrives in pieces with CRLF', () => {
    const out = new BootOutput();
    expect(out.feed('stdout', fc('main', 'INFO', 'Running Firecracker v1.10.1'))).toBeUndefined();
    expect(out.feed('stdout', '[    0.000000] Linux version 6.1.0\r\n[    0.412000] Run /aegis-kvm-')).toBeUndefined();
    expect(out.feed('stdout', 'probe-no-such-init as init process\r\n')).toEqual({
      usable: true,
      detail: 'the guest kernel ran under KVM: [    0.412000] Run /aegis-kvm-probe-no-such-init as init process',
    });
  });

  it("counts a vCPU or KVM failure only in Firecracker's own lines, not the guest's mentions of kvm", () => {
    const out = new BootOutput();
    expect(out.feed('stdout', '[    0.000000] kvm-clock: Using msrs 4b564d01 and 4b564d00\r\n')).toBeUndefined();
    expect(out.feed('stdout', '[    0.010000] kvm-guest: failed to enable PV feature\r\n')).toBeUndefined();
    expect(out.feed('stdout', fc('fc_vmm', 'WARN', 'Failed to register serial input fd: Operation not permitted'))).toBeUndefined();
    expect(out.feed('stdout', fc('fc_vcpu 0', 'INFO', 'Received KVM_EXIT_SHUTDOWN signal'))).toEqual({
      usable: false,
      detail: 'Firecracker: Received KVM_EXIT_SHUTDOWN signal',
    });
  });

  it('reports an early exit with the last error Firecracker logged, not its exit line', () => {
    const out = new BootOutput();
    out.feed('stdout', fc('main', 'ERROR', 'Failed to build MicroVM from Json: Cannot create VM'));
    out.feed('stderr', 'Error: RunWithoutApiError(BuildMicroVMFromJson(...))\n');
    out.feed('stdout', fc('main', 'ERROR', 'Firecracker exiting with error. exit_code=1'));
    expect(out.end()).toBeUndefined();
    expect(out.exitDetail(1, null).detail).toBe(
      'Firecracker exited with status 1 before the guest kernel reached its root mount: Failed to build MicroVM from Json: Cannot create VM',
    );
  });

  it('falls back to stderr when nothing was logged, and tells silence from a slow guest at the deadline', () => {
    const silent = new BootOutput();
    silent.feed('stderr', 'thread panicked');
    expect(silent.end()).toBeUndefined();
    expect(silent.exitDetail(null, 'SIGABRT').detail).toBe(
      'Firecracker was killed by SIGABRT before the guest kernel reached its root mount: thread panicked',
    );
    expect(new BootOutput().timeoutDetail(5000)).toBe('no sign of life within 5000 ms');
    const slow = new BootOutput();
    slow.feed('stdout', '[    0.000000] Linux version 6.1.0\r\n');
    expect(slow.timeoutDetail(5000)).toBe(
      'the guest kernel did not reach its root mount within 5000 ms (last console line: [    0.000000] Linux version 6.1.0)',
    );
  });
});

describe('firecrackerLogLine', () => {
  it('reads the level when --show-level put it there, and leaves console lines alone', () => {
    expect(firecrackerLogLine('2025-01-01T00:00:00 [aegis-kvm-probe:fc_vcpu 0:ERROR] boom')).toEqual({ level: 'ERROR', message: 'boom' });
    expect(firecrackerLogLine('2025-01-01T00:00:00 [aegis-kvm-probe:main] hi')).toEqual({ level: undefined, message: 'hi' });
    expect(firecrackerLogLine('[    0.000000] Linux version 6.1.0')).toBeUndefined();
  });
});
