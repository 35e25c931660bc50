import { describe, expect, it } from 'vitest';
import { AegisError, type ErrorCode } from '@aegis/protocol';
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
    const err = errorOf(() => validateBody('NoSuchSchema', {}));
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

describe('specPaths', () => {
  it('lists the versioned instance endpoints of the OpenAPI document', () => {
    const paths = specPaths();
    expect(paths).toContain('/v1/instances');
    expect(paths).toContain('/v1/instances/{ref}');
    for (const p of paths) expect(p).toMatch(/^\//);
  });
});
