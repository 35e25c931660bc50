import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { formatVolumes, parseVolume } from './volumes.js';

describe('parseVolume (docker -v)', () => {
  it('reads HOST:GUEST and NAME:GUEST, with :ro or :rw, and collects them in order', () => {
    let v = parseVolume('/home/me/src:/src:ro');
    v = parseVolume('cache:/root/.cache', v);
    v = parseVolume('/tmp:/t:rw', v);
    expect(v).toEqual([
      { type: 'bind', source: '/home/me/src', target: '/src', readOnly: true },
      { type: 'volume', source: 'cache', target: '/root/.cache', readOnly: false },
      { type: 'bind', source: '/tmp', target: '/t', readOnly: false },
    ]);
  });

  it('resolves a host path that starts with . against the working directory', () => {
    expect(parseVolume('.:/work')[0]?.source).toBe(process.cwd());
    expect(parseVolume('./a/../b:/work')[0]?.source).toBe(path.resolve('b'));
    expect(parseVolume('../x:/work')[0]?.source).toBe(path.resolve('../x'));
  });

  it('refuses what Docker would not take, or what we do not support, with the reason', () => {
    expect(() => parseVolume('/anonymous')).toThrow(/anonymous volumes are not supported/);
    expect(() => parseVolume('cache:relative')).toThrow(/guest path must be absolute/);
    expect(() => parseVolume('cache:/x:z')).toThrow(/mode must be ro or rw/);
    expect(() => parseVolume('cache:/x:ro,z')).toThrow(/mode must be ro or rw/);
    expect(() => parseVolume('a:b:c:d')).toThrow(/paths with ':'/);
    expect(() => parseVolume('some/dir:/x')).toThrow(/must be an absolute path or start with \.\//);
  });

  it('prints mounts back in the same syntax', () => {
    expect(formatVolumes(parseVolume('cache:/c:ro', parseVolume('/s:/src')))).toBe('/s:/src, cache:/c:ro');
  });
});
