import { describe, expect, it } from 'vitest';
import { AegisError, type ErrorCode } from '@aegis/protocol';
import type { ApiSchemaName } from '@aegis/protocol/api';
import { specPaths, validateBody } from './validate.js';

function errorOf(fn: () => unknown): AegisError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(AegisError);
    return err as AegisError;
  }
  throw new Error('expected validation to fail');
}

/** Validates a CreateInstanceRequest that must fail, and returns the error message. */
function rejectCreate(body: unknown, code: ErrorCode = 'INVALID_ARGUMENT'): string {
  const err = errorOf(() => validateBody('CreateInstanceRequest', body));
  expect(err.code).toBe(code);
  return err.message;
}

describe('validateBody: CreateInstanceRequest', () => {
  it('accepts a minimal body and returns it as is', () => {
    const body = { command: ['echo', 'hi'] };
    expect(validateBody('CreateInstanceRequest', body)).toBe(body);
  });

  it('accepts a body using every field within its limits', () => {
    const body = {
      command: ['sh', '-c', 'echo $GREETING'],
      handle: 'web-1.test_a',
      env: { GREETING: 'hello', _PRIVATE: '', PATH2: '/bin' },
      workdir: '/srv/app',
      memoryMiB: 128,
      vcpuCount: 64,
    };
    expect(() => validateBody('CreateInstanceRequest', body)).not.toThrow();
    expect(() => validateBody('CreateInstanceRequest', { command: ['x'], memoryMiB: 65536, vcpuCount: 1 })).not.toThrow();
  });

  it('accepts a command whose arguments are empty strings, as long as there is one', () => {
    expect(() => validateBody('CreateInstanceRequest', { command: [''] })).not.toThrow();
  });

  it('refuses an empty command, naming the field', () => {
    const msg = rejectCreate({ command: [] });
    expect(msg).toMatch(/^invalid request: /);
    expect(msg).toContain('command');
    expect(msg).toMatch(/fewer than 1/);
  });

  it('refuses a body without a command', () => {
    expect(rejectCreate({})).toContain("'command'");
  });

  it('refuses a command that is not a list of strings, naming the element', () => {
    expect(rejectCreate({ command: 'echo hi' })).toContain('command');
    expect(rejectCreate({ command: ['echo', 1] })).toContain('command.1');
  });

  it('refuses an unknown field, naming it', () => {
    const msg = rejectCreate({ command: ['x'], memory: 512 });
    expect(msg).toContain('unknown field "memory"');
  });

  it('refuses a body that is not an object', () => {
    for (const body of [null, undefined, 'x', 42, [['echo']]]) {
      expect(rejectCreate(body)).toMatch(/^invalid request: body /);
    }
  });

  it('refuses a handle that does not match the pattern, naming the field', () => {
    for (const handle of ['', '-web', '.web', 'web 1', 'web/1', 'wéb', 'a'.repeat(64)]) {
      const msg = rejectCreate({ command: ['x'], handle });
      expect(msg, JSON.stringify(handle)).toContain('handle');
      expect(msg).toContain('pattern');
    }
  });

  it('accepts a handle of exactly 63 characters', () => {
    expect(() => validateBody('CreateInstanceRequest', { command: ['x'], handle: 'a'.repeat(63) })).not.toThrow();
  });

  it('refuses memoryMiB below or above its range, or not an integer, naming the field', () => {
    expect(rejectCreate({ command: ['x'], memoryMiB: 127 })).toMatch(/memoryMiB must be >= 128/);
    expect(rejectCreate({ command: ['x'], memoryMiB: 65537 })).toMatch(/memoryMiB must be <= 65536/);
    expect(rejectCreate({ command: ['x'], memoryMiB: 512.5 })).toMatch(/memoryMiB must be integer/);
    expect(rejectCreate({ command: ['x'], memoryMiB: '512' })).toContain('memoryMiB');
  });

  it('refuses vcpuCount outside 1..64', () => {
    expect(rejectCreate({ command: ['x'], vcpuCount: 0 })).toContain('vcpuCount');
    expect(rejectCreate({ command: ['x'], vcpuCount: 65 })).toContain('vcpuCount');
  });

  it('refuses a relative workdir', () => {
    expect(rejectCreate({ command: ['x'], workdir: 'srv/app' })).toContain('workdir');
  });

  it('refuses an environment variable name containing "=", naming env', () => {
    const msg = rejectCreate({ command: ['x'], env: { 'A=B': 'c' } });
    expect(msg).toContain('env');
  });

  it('refuses other malformed environment variable names', () => {
    for (const key of ['', '1ABC', 'A-B', 'A B']) {
      expect(rejectCreate({ command: ['x'], env: { [key]: 'v' } }), JSON.stringify(key)).toContain('env');
    }
  });

  it('refuses a non-string environment value, naming the variable', () => {
    expect(rejectCreate({ command: ['x'], env: { A: 1 } })).toContain('env.A');
  });
});

describe('validateBody: other schemas', () => {
  it('reports an unknown schema name as INTERNAL, since it is a bug in the daemon', () => {
    // Only a cast gets past the compiler: the names are the spec's, typed.
    const err = errorOf(() => validateBody('NoSuchSchema' as ApiSchemaName, {}));
    expect(err.code).toBe('INTERNAL');
    expect(err.message).toContain('NoSuchSchema');
  });

  it('validates the same schema repeatedly with consistent results', () => {
    for (let i = 0; i < 3; i++) {
      expect(() => validateBody('CreateInstanceRequest', { command: ['x'] })).not.toThrow();
      expect(rejectCreate({ command: [] })).toContain('command');
    }
  });
});

describe('validateBody: NUL bytes', () => {
  const nul = (schema: ApiSchemaName, body: unknown): string => {
    const err = errorOf(() => validateBody(schema, body));
    expect(err.code).toBe('INVALID_ARGUMENT');
    return err.message;
  };

  // Regression: the VM booted, then spawning the command failed on the NUL: 500 INTERNAL.
  it('a NUL byte in a command element, env value, workdir or image of a create request is INVALID_ARGUMENT, saying so', () => {
    expect(nul('CreateInstanceRequest', { command: ['echo', 'a\u0000b'] })).toBe('invalid request: command.1 must not contain a NUL byte');
    expect(nul('CreateInstanceRequest', { command: ['x'], env: { A: '\u0000' } })).toBe(
      'invalid request: env.A must not contain a NUL byte',
    );
    expect(nul('CreateInstanceRequest', { command: ['x'], workdir: '/a\u0000' })).toBe(
      'invalid request: workdir must not contain a NUL byte',
    );
    expect(nul('CreateInstanceRequest', { image: 'alpine\u0000' })).toBe('invalid request: image must not contain a NUL byte');
    // A relative workdir is still told apart from one with a NUL.
    expect(nul('CreateInstanceRequest', { command: ['x'], workdir: 'a' })).toContain('must match pattern');
  });

  it('a NUL byte in an env key, handle or secret name of a create request is INVALID_ARGUMENT', () => {
    expect(nul('CreateInstanceRequest', { command: ['x'], env: { 'A\u0000': 'v' } })).toContain('env has an invalid name');
    expect(nul('CreateInstanceRequest', { command: ['x'], handle: 'a\u0000' })).toContain('handle');
    expect(nul('CreateInstanceRequest', { command: ['x'], secrets: ['A\u0000'] })).toContain('secrets.0');
  });

  it('a NUL byte in an exec request is INVALID_ARGUMENT as in a create request', () => {
    expect(nul('ExecRequest', { command: ['\u0000'] })).toBe('invalid request: command.0 must not contain a NUL byte');
    expect(nul('ExecRequest', { command: ['x'], env: { B: 'x\u0000y' } })).toBe('invalid request: env.B must not contain a NUL byte');
    expect(nul('ExecRequest', { command: ['x'], workdir: '/\u0000' })).toBe('invalid request: workdir must not contain a NUL byte');
  });

  it('a NUL byte in a secret value or an image pull or import is INVALID_ARGUMENT', () => {
    expect(nul('SetSecretRequest', { value: 'a\u0000' })).toBe('invalid request: value must not contain a NUL byte');
    expect(nul('PullImageRequest', { reference: '\u0000' })).toBe('invalid request: reference must not contain a NUL byte');
    expect(nul('ImportImageRequest', { path: '/x\u0000' })).toBe('invalid request: path must not contain a NUL byte');
    expect(nul('ImportImageRequest', { path: '/x', reference: 'r\u0000' })).toBe('invalid request: reference must not contain a NUL byte');
  });

  it('still accepts other control characters and any unicode in commands and values', () => {
    expect(() =>
      validateBody('CreateInstanceRequest', { command: ['printf', '\u0001\t\n\u007f é 😀'], env: { A: '\u001b[1m' } }),
    ).not.toThrow();
    expect(() => validateBody('SetSecretRequest', { value: 'p@ss\nword' })).not.toThrow();
  });
});

describe('validateBody: exposes', () => {
  // Regression: "not-an-ip" reached listen(), which resolved it: a DNS query left the machine.
  it('a hostIp that is not an IPv4 or IPv6 literal is INVALID_ARGUMENT, so no host name is ever resolved', () => {
    for (const hostIp of ['not-an-ip', 'localhost', 'example.com', '', ' 127.0.0.1', '127.1', '0x7f.0.0.1', '256.0.0.1', '[::1]']) {
      const msg = rejectCreate({ command: ['x'], exposes: [{ guestPort: 8080 }, { guestPort: 80, hostIp }] });
      expect(msg, JSON.stringify(hostIp)).toContain('exposes.1.hostIp must be an IPv4 or IPv6 address');
    }
  });

  it('accepts IPv4 and IPv6 literals, and no hostIp at all', () => {
    for (const hostIp of ['127.0.0.1', '0.0.0.0', '192.168.1.20', '::1', '::', 'fe80::1', '::ffff:127.0.0.1']) {
      expect(() => validateBody('CreateInstanceRequest', { command: ['x'], exposes: [{ guestPort: 80, hostIp }] }), hostIp).not.toThrow();
    }
    expect(() => validateBody('CreateInstanceRequest', { command: ['x'], exposes: [{ guestPort: 80, hostPort: 0 }] })).not.toThrow();
  });
});

describe('validateBody: volumes', () => {
  const v = (over: Record<string, unknown>): unknown => ({
    command: ['x'],
    volumes: [{ type: 'volume', source: 'c', target: '/c', ...over }],
  });

  it('accepts host directories and named volumes, read-only or not', () => {
    const body = {
      command: ['x'],
      volumes: [
        { type: 'bind', source: '/home/me', target: '/w', readOnly: true },
        { type: 'volume', source: 'cache', target: '/root/.cache' },
      ],
    };
    expect(validateBody('CreateInstanceRequest', body)).toBe(body);
  });

  it('refuses unknown fields and types, bad names, relative and reserved targets, and a target given twice', () => {
    expect(rejectCreate(v({ propagation: 'rshared' }))).toContain('unknown field "propagation"');
    expect(rejectCreate(v({ type: 'tmpfs' }))).toContain('volumes.0.type');
    expect(rejectCreate(v({ source: 'a/b' }))).toContain('is not a volume name');
    expect(rejectCreate(v({ type: 'bind', source: 'rel' }))).toContain('absolute host path');
    expect(rejectCreate(v({ target: 'c' }))).toContain('volumes.0.target');
    expect(rejectCreate(v({ target: '/sys/x' }))).toContain('reserved');
    expect(rejectCreate(v({ target: '/a/../b' }))).toContain('"." or ".."');
    const twice = {
      command: ['x'],
      volumes: [
        { type: 'volume', source: 'c', target: '/c' },
        { type: 'bind', source: '/h', target: '/c/' },
      ],
    };
    expect(rejectCreate(twice)).toContain('volumes.1.target /c is given twice');
  });
});

describe('validateBody: messages', () => {
  it('cuts a huge unknown field name or env name short in the message', () => {
    const long = 'x'.repeat(100_000);
    expect(rejectCreate({ command: ['x'], [long]: 1 }).length).toBeLessThan(200);
    expect(rejectCreate({ command: ['x'], env: { [`-${long}`]: 'v' } }).length).toBeLessThan(200);
  });
});

describe('specPaths', () => {
  it('lists the versioned instance endpoints of the OpenAPI document', () => {
    const paths = specPaths();
    expect(paths).toContain('/v1/instances');
    expect(paths).toContain('/v1/instances/{ref}');
    for (const p of paths) expect(p).toMatch(/^\//);
  });
});
