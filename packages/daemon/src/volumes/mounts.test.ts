import { describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { attachConflict, checkMounts, mountOrder, normalTarget, type VolumeMount } from './mounts.js';

const bind = (target: string, source = '/home/me/src'): VolumeMount => ({ type: 'bind', source, target, readOnly: false });
const vol = (source: string, target: string): VolumeMount => ({ type: 'volume', source, target, readOnly: false });

function refusal(mounts: VolumeMount[]): string {
  try {
    checkMounts(mounts);
  } catch (err) {
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    return (err as Error).message;
  }
  throw new Error('expected a refusal');
}

describe('checkMounts', () => {
  it('takes host directories and named volumes at distinct absolute targets', () => {
    expect(() => checkMounts([bind('/work'), vol('cache', '/root/.cache'), vol('a.b-c_9', '/work/x')])).not.toThrow();
  });

  it('refuses a relative, dotted or reserved target, naming the field', () => {
    expect(refusal([bind('work')])).toContain('volumes.0.target');
    expect(refusal([bind('/work/../etc')])).toContain('"." or ".."');
    expect(refusal([bind('/')])).toContain('reserved');
    for (const t of ['/proc', '/sys/fs', '/dev', '/aegis/image', '/aegis']) expect(refusal([bind(t)])).toContain('reserved');
    // Only the exact directories: /devices is not /dev.
    expect(() => checkMounts([bind('/devices'), bind('/aegisx')])).not.toThrow();
  });

  it('refuses the same target twice, also spelled with a trailing slash', () => {
    expect(refusal([bind('/work'), vol('cache', '/work/')])).toContain('volumes.1.target /work is given twice');
  });

  it('refuses a volume name that is a path or not Docker-like, and a relative host path', () => {
    expect(refusal([vol('../x', '/a')])).toContain('is not a volume name');
    expect(refusal([vol('-x', '/a')])).toContain('is not a volume name');
    expect(refusal([vol('x'.repeat(65), '/a')])).toContain('is not a volume name');
    expect(refusal([bind('/a', 'relative/dir')])).toContain('absolute host path');
  });
});

describe('normalTarget', () => {
  it('drops trailing slashes and refuses what is not a plain absolute path', () => {
    expect(normalTarget('/a/b/')).toBe('/a/b');
    expect(normalTarget('/a//b')).toBeUndefined();
    expect(normalTarget('/a/./b')).toBeUndefined();
    expect(normalTarget('a')).toBeUndefined();
    expect(normalTarget('/')).toBe('/');
  });
});

describe('mountOrder', () => {
  it('mounts a parent before what is mounted inside it, keeping the given order otherwise', () => {
    const order = mountOrder([vol('c', '/work/cache'), bind('/work'), bind('/src'), vol('d', '/work/cache/deep')]);
    expect(order.map((m) => m.target)).toEqual(['/work', '/src', '/work/cache', '/work/cache/deep']);
  });
});

describe('attachConflict', () => {
  it('lets any number of readers share a volume', () => {
    expect(attachConflict('v', true, [])).toBeUndefined();
    expect(attachConflict('v', true, [{ handle: 'a', readOnly: true }])).toBeUndefined();
  });

  it('lets a writer have a volume only alone', () => {
    expect(attachConflict('v', false, [])).toBeUndefined();
    expect(attachConflict('v', false, [{ handle: 'a', readOnly: true }])).toMatch(/attached read-only to "a"/);
    expect(attachConflict('v', false, [{ handle: 'w', readOnly: false }])).toMatch(/attached read-write to instance "w"/);
  });

  it('keeps a reader away from a volume that has a writer: ext4 has no second kernel', () => {
    expect(attachConflict('v', true, [{ handle: 'w', readOnly: false }])).toMatch(/one writer and no other user/);
  });
});
