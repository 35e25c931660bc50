import { describe, expect, it } from 'vitest';
import { DEFAULT_KVM_TEST_TIMEOUT_MS, kvmTestTimeoutMs } from './accel.js';

describe('kvmTestTimeoutMs', () => {
  it('is 5 s unless AEGIS_KVM_TEST_TIMEOUT_MS says, and refuses what is not a sane deadline', () => {
    expect(kvmTestTimeoutMs({})).toBe(DEFAULT_KVM_TEST_TIMEOUT_MS);
    expect(kvmTestTimeoutMs({ AEGIS_KVM_TEST_TIMEOUT_MS: '' })).toBe(5000);
    expect(kvmTestTimeoutMs({ AEGIS_KVM_TEST_TIMEOUT_MS: '15000' })).toBe(15_000);
    for (const bad of ['10s', '-1', '499', '600001', '1.5', 'NaN']) {
      expect(() => kvmTestTimeoutMs({ AEGIS_KVM_TEST_TIMEOUT_MS: bad })).toThrow(/AEGIS_KVM_TEST_TIMEOUT_MS=.*500 to 600000/);
    }
  });
});
