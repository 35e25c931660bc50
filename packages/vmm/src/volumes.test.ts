import { describe, expect, it } from 'vitest';
import { decodeGuestPath, encodeGuestPath, virtioDiskName, volumeKernelArg } from './volumes.js';

describe('volume words on the kernel command line', () => {
  it('keeps a plain path readable and escapes what a command-line word cannot hold', () => {
    expect(encodeGuestPath('/root/.cache')).toBe('/root/.cache');
    expect(encodeGuestPath('/my dir,x"y%')).toBe('/my%20dir%2Cx%22y%25');
    for (const p of ['/my dir,x"y%', '/données/€', '/a\tb\nc', '/=:;']) expect(decodeGuestPath(encodeGuestPath(p))).toBe(p);
  });

  it('is one word: FSTYPE,SOURCE,MODE,PATH', () => {
    expect(volumeKernelArg(2, 'ext4', '/dev/vdd', true, '/data set')).toBe('aegis_vol2=ext4,/dev/vdd,ro,/data%20set');
    expect(volumeKernelArg(0, '9p', 'aegis0', false, '/work')).toBe('aegis_vol0=9p,aegis0,rw,/work');
    expect(() => volumeKernelArg(0, '9p', 'a b', false, '/w')).toThrow();
  });

  it('names virtio disks in the order they are attached', () => {
    expect(virtioDiskName(0)).toBe('/dev/vda');
    expect(virtioDiskName(3)).toBe('/dev/vdd');
    expect(() => virtioDiskName(26)).toThrow();
  });
});
