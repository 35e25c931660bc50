import { describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { formatReference, parseReference, registryHost, validateDigest } from './reference.js';

const HEX = 'a'.repeat(64);

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return isAegisError(err) ? err.code : 'not an AegisError';
  }
  return undefined;
}

describe('parseReference', () => {
  it.each([
    ['alpine', 'docker.io/library/alpine:latest'],
    ['alpine:3.20', 'docker.io/library/alpine:3.20'],
    ['team/tools:1.2', 'docker.io/team/tools:1.2'],
    ['docker.io/alpine', 'docker.io/library/alpine:latest'],
    ['index.docker.io/library/alpine', 'docker.io/library/alpine:latest'],
    ['registry.example:5000/team/tools:1.2', 'registry.example:5000/team/tools:1.2'],
    ['localhost/tools', 'localhost/tools:latest'],
    ['localhost:5000/a/b/c', 'localhost:5000/a/b/c:latest'],
    ['127.0.0.1:5000/team/tools', '127.0.0.1:5000/team/tools:latest'],
    ['[::1]:5000/team/tools', '[::1]:5000/team/tools:latest'],
    ['ghcr.io/org/my_image__x-y.z:v1.0-rc_1', 'ghcr.io/org/my_image__x-y.z:v1.0-rc_1'],
    [`alpine@sha256:${HEX}`, `docker.io/library/alpine@sha256:${HEX}`],
    [`alpine:3.20@sha256:${HEX}`, `docker.io/library/alpine:3.20@sha256:${HEX}`],
    ['  alpine  ', 'docker.io/library/alpine:latest'],
  ])('%s normalises to %s', (input, canonical) => {
    expect(formatReference(parseReference(input))).toBe(canonical);
  });

  it('splits the parts the way Docker does', () => {
    expect(parseReference('registry.example:5000/team/tools:1.2')).toEqual({
      registry: 'registry.example:5000',
      repository: 'team/tools',
      tag: '1.2',
    });
    expect(parseReference(`team/tools@sha256:${HEX}`)).toEqual({
      registry: 'docker.io',
      repository: 'team/tools',
      digest: `sha256:${HEX}`,
    });
  });

  it('treats a first component without a dot, colon or "localhost" as part of the repository', () => {
    expect(parseReference('team/tools').registry).toBe('docker.io');
    expect(parseReference('team/tools').repository).toBe('team/tools');
  });

  it.each([
    ['', 'empty'],
    ['Alpine', 'lowercase'],
    ['team/Tools', 'lowercase'],
    ['alpine:', 'tag'],
    ['alpine:-x', 'tag'],
    ['alpine:' + 'x'.repeat(129), 'tag'],
    ['alpine@sha256:abc', 'digest'],
    [`alpine@sha256:${'A'.repeat(64)}`, 'digest'],
    ['team//tools', 'empty path component'],
    ['team/tools/', 'empty path component'],
    ['team/to--ols_', 'path component'],
    ['registry.example:5000/', 'missing'],
    ['-bad.example/x', 'registry host'],
    [`registry.example/${'a/'.repeat(130)}b`, 'longer than'],
  ])('rejects %j with INVALID_ARGUMENT mentioning %s', (input, hint) => {
    let error: unknown;
    try {
      parseReference(input);
    } catch (err) {
      error = err;
    }
    expect(isAegisError(error, 'INVALID_ARGUMENT')).toBe(true);
    expect((error as Error).message).toContain(hint);
  });

  it('rejects digests of other algorithms as UNSUPPORTED rather than malformed', () => {
    expect(codeOf(() => parseReference(`alpine@sha512:${'a'.repeat(128)}`))).toBe('UNSUPPORTED');
  });
});

describe('validateDigest', () => {
  it('accepts sha256 with 64 lowercase hex digits only', () => {
    expect(validateDigest(`sha256:${HEX}`)).toBe(`sha256:${HEX}`);
    expect(codeOf(() => validateDigest(`sha256:${HEX}0`))).toBe('INVALID_ARGUMENT');
    expect(codeOf(() => validateDigest(HEX))).toBe('INVALID_ARGUMENT');
    expect(codeOf(() => validateDigest(`sha384:${'b'.repeat(96)}`))).toBe('UNSUPPORTED');
  });
});

describe('registryHost', () => {
  it('sends Docker Hub traffic to its API host and everything else where it says', () => {
    expect(registryHost(parseReference('alpine'))).toBe('registry-1.docker.io');
    expect(registryHost(parseReference('ghcr.io/a/b'))).toBe('ghcr.io');
    expect(registryHost(parseReference('localhost:5000/a'))).toBe('localhost:5000');
  });
});
