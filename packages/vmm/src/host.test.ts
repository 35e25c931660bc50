import { describe, expect, it } from 'vitest';
import { hostCpuFingerprint } from './host.js';

const CPU = (flags: string, mhz: string): string =>
  `processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\ncpu MHz\t\t: ${mhz}\nflags\t\t: ${flags}\n`;

describe('hostCpuFingerprint', () => {
  it("changes with the CPU's model or any feature flag, not with its clock or the other processors", () => {
    const base = hostCpuFingerprint(`${CPU('fpu sse avx2', '2450.000')}\n${CPU('fpu', '1.0')}`);
    expect(base).toMatch(/^host:[0-9a-f]{16}$/);
    expect(hostCpuFingerprint(CPU('fpu sse avx2', '3000.123'))).toBe(base);
    expect(hostCpuFingerprint(CPU('fpu sse', '2450.000'))).not.toBe(base);
    expect(hostCpuFingerprint(CPU('fpu sse avx2', '2450.000').replace('7B13', '7763'))).not.toBe(base);
    // This machine's own: stable across calls.
    expect(hostCpuFingerprint()).toBe(hostCpuFingerprint());
  });
});
