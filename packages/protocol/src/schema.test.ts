import { describe, expect, it } from 'vitest';
import { AegisError } from './errors.js';
import { guestRpcSchema } from './generated/guest-rpc.js';
import { parseEvent, parseParams, parseResult } from './guest.js';
import { SchemaParsers, type Schema } from './schema.js';

function message(f: () => unknown): string {
  try {
    f();
  } catch (err) {
    expect(err).toBeInstanceOf(AegisError);
    expect((err as AegisError).code).toBe('INVALID_ARGUMENT');
    return (err as AegisError).message;
  }
  throw new Error('accepted what it should refuse');
}

describe('the guest parsers, driven by spec/guest-rpc.schema.json', () => {
  // The words the hand-written parsers sent before the schema drove them: the host logs them
  // and a guest's failure reason carries them.
  it('refuse with the same messages as before for every top-level field', () => {
    expect(message(() => parseParams.run({ command: ['x'], extra: 1 }))).toBe('run params: unknown field "extra"');
    expect(message(() => parseParams.run({ command: [] }))).toBe('command must be a non-empty array of strings');
    expect(message(() => parseParams.run({ command: ['x', 1] }))).toBe('command[1] must be a string');
    expect(message(() => parseParams.run({ command: ['x'], env: { A: 1 } }))).toBe('env.A must be a string');
    expect(message(() => parseParams.run({ command: ['x'], user: 'u'.repeat(257) }))).toBe(
      'user must be a string of at most 256 characters',
    );
    expect(message(() => parseParams.run({ command: ['x'], tty: { rows: 0, cols: 80 } }))).toBe(
      'tty size must be 1..1000 rows and columns',
    );
    expect(message(() => parseParams.resize({ rows: 24, cols: 1001 }))).toBe('tty size must be 1..1000 rows and columns');
    expect(message(() => parseParams.exec({ command: ['x'] }))).toBe('execId must be a string');
    expect(message(() => parseParams.fresh({ timeMs: 1, hostname: '-x', entropy: '' }))).toBe('hostname has characters a hostname cannot');
    expect(message(() => parseParams.health([]))).toBe('health params must be an object');
    expect(message(() => parseResult.run({ pid: 1, startedAtMs: -1 }))).toBe('startedAtMs must be between 0 and 9007199254740991');
    expect(message(() => parseResult.stats({ memTotalKiB: 10, memAvailableKiB: 11, processes: 1 }))).toBe(
      'memAvailableKiB must be between 0 and 10',
    );
    expect(message(() => parseResult.ps({ processes: {} }))).toBe('processes must be an array of at most 4096');
    expect(message(() => parseResult.health({ version: 1, uptimeMs: 1, workload: 1 }))).toBe('workload must be an object');
    expect(message(() => parseResult.signal({ x: 1 }))).toBe('signal result: unknown field "x"');
    expect(message(() => parseEvent.exit({ exitCode: 256, signal: null }))).toBe('exitCode must be between 0 and 255');
    expect(message(() => parseEvent.exit({ exitCode: 0, signal: 'KILL' }))).toBe(
      'signal must be a signal name (SIG..., at most 32 characters) or null',
    );
    expect(message(() => parseEvent.exit({ exitCode: 0, signal: null, truncated: 1 }))).toBe('truncated must be true or false');
    expect(message(() => parseEvent.output({ stream: 'stdin', data: '' }))).toBe('stream must be stdout or stderr');
    expect(message(() => parseEvent.output({ stream: 'stdout', data: 'aGk' }))).toBe('data must be base64');
    expect(message(() => parseEvent.ready(null))).toBe('ready must be an object');
  });

  it('name a nested field by its path', () => {
    expect(message(() => parseEvent.exit({ exitCode: 0, signal: null, bytes: { stdout: -1, stderr: 0 } }))).toBe(
      'bytes.stdout must be between 0 and 9007199254740991',
    );
    expect(message(() => parseResult.health({ version: 1, uptimeMs: 1, workload: { pid: 1, running: 'yes' } }))).toBe(
      'workload.running must be true or false',
    );
    expect(message(() => parseParams.run({ command: ['x'], tty: { rows: 1, cols: 1, x: 1 } }))).toBe('tty: unknown field "x"');
  });

  it('return a copy with only the named fields, and the defaults filled in', () => {
    const sent = { command: ['id'] };
    const parsed = parseParams.run(sent);
    expect(parsed).toEqual({ command: ['id'], env: {} });
    expect(parsed).not.toBe(sent);
    expect(parseParams.shutdown(undefined)).toEqual({});
    expect(parseParams.ps(null)).toEqual({});
  });

  it('refuse, when built, a schema keyword they do not check', () => {
    const parsers = new SchemaParsers({});
    const nested = { type: 'object', properties: { a: { type: 'string', format: 'email' } } } as Schema;
    expect(() => parsers.parser(nested, 'x')).toThrow(/keyword format is not supported/);
    expect(() => parsers.parser({ type: 'array', items: { $ref: '#/$defs/Nope' } }, 'x')).toThrow(/unresolvable/);
  });

  it('compile every method and event of the schema', () => {
    for (const m of Object.keys(guestRpcSchema.methods) as (keyof typeof parseParams)[]) {
      expect(() => parseParams[m]({ __probe: 1 })).toThrow(AegisError);
      expect(() => parseResult[m]({ __probe: 1 })).toThrow(AegisError);
    }
    for (const e of Object.keys(guestRpcSchema.events) as (keyof typeof parseEvent)[]) {
      expect(() => parseEvent[e]({ __probe: 1 })).toThrow(AegisError);
    }
  });
});
