import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { AegisError } from './errors.js';
import { parseEvent, parseParams, parseResult } from './guest.js';

describe('guest contract parsers', () => {
  it('accept well-formed run params', () => {
    expect(parseParams.run({ command: ['echo', 'hi'], env: { A: 'b' } })).toEqual({ command: ['echo', 'hi'], env: { A: 'b' } });
  });

  it('reject an empty command, unknown fields and wrong types', () => {
    expect(() => parseParams.run({ command: [], env: {} })).toThrow(/non-empty/);
    expect(() => parseParams.run({ command: ['x'], env: {}, extra: 1 })).toThrow(/unknown field "extra"/);
    expect(() => parseParams.exec({ execId: 1, command: ['x'] })).toThrow(/execId/);
  });

  it('check notifications from the untrusted guest', () => {
    expect(parseEvent.output({ stream: 'stdout', data: 'aGk=' })).toEqual({ stream: 'stdout', data: 'aGk=' });
    expect(() => parseEvent.output({ stream: 'stdin', data: '' })).toThrow(/stream/);
    expect(() => parseEvent.exit({ exitCode: '3', signal: null })).toThrow(/exitCode/);
    expect(parseEvent.exit({ exitCode: null, signal: 'SIGKILL' })).toEqual({ exitCode: null, signal: 'SIGKILL' });
  });
});

describe('strict guest messages', () => {
  // What packages/harness/src sends, field for field (main.ts and processes.ts).
  const fromHarness = {
    ready: [{ version: 1 }],
    output: [
      { stream: 'stdout', data: 'aGk=' },
      { execId: 'a1b2c3d4e5f6', stream: 'stderr', data: '' },
    ],
    exit: [
      { exitCode: 0, signal: null },
      { exitCode: null, signal: 'SIGKILL', bytes: { stdout: 10, stderr: 0 } },
      { exitCode: 1, signal: null, bytes: { stdout: 0, stderr: 3 }, truncated: true },
    ],
    execExit: [
      { execId: 'e1', exitCode: 0, signal: null, durationMs: 5 },
      { execId: 'e1', exitCode: 0, signal: null, bytes: { stdout: 1, stderr: 2 }, truncated: false, durationMs: 0 },
    ],
  } as const;

  it('accepts every notification the harness sends, new optional fields (bytes, truncated) included', () => {
    for (const [event, samples] of Object.entries(fromHarness)) {
      for (const params of samples) expect(parseEvent[event as keyof typeof fromHarness](params)).toEqual(params);
    }
  });

  it('every guest notification with an unknown field is refused with INVALID_ARGUMENT', () => {
    fc.assert(
      fc.property(
        fc.constantFrom(...(Object.keys(fromHarness) as (keyof typeof fromHarness)[])),
        fc.string({ minLength: 1 }),
        fc.jsonValue(),
        (event, key, value) => {
          const base = fromHarness[event][0] as Record<string, unknown>;
          fc.pre(!Object.hasOwn(base, key) && !['execId', 'bytes', 'truncated', 'durationMs'].includes(key));
          const err = refusal(() => parseEvent[event]({ ...base, [key]: value }));
          expect(err.code).toBe('INVALID_ARGUMENT');
        },
      ),
    );
    expect(() => parseEvent.exit({ exitCode: 0, signal: null, bytes: { stdout: 0, stderr: 0, stdin: 0 } })).toThrow(
      /unknown field "stdin"/,
    );
    // A prototype key is a field like any other.
    expect(() => parseEvent.ready(JSON.parse('{"version":1,"__proto__":{"x":1}}'))).toThrow(/unknown field "__proto__"/);
  });

  it('every guest result with an unknown field is refused, and the empty results must be exactly {}', () => {
    const good = {
      run: { pid: 10, startedAtMs: 1700000000000 },
      exec: { pid: 11 },
      health: { version: 1, uptimeMs: 1, workload: { pid: 10, running: true } },
    } as const;
    expect(parseResult.run(good.run)).toEqual(good.run);
    expect(parseResult.exec(good.exec)).toEqual(good.exec);
    expect(parseResult.health(good.health)).toEqual(good.health);
    expect(parseResult.health({ version: 1, uptimeMs: 1, workload: null })).toEqual({ version: 1, uptimeMs: 1, workload: null });
    expect(() => parseResult.run({ ...good.run, extra: 1 })).toThrow(/unknown field "extra"/);
    expect(() => parseResult.exec({ pid: 11, x: 1 })).toThrow(/unknown field/);
    expect(() => parseResult.health({ ...good.health, x: 1 })).toThrow(/unknown field/);
    expect(() => parseResult.health({ ...good.health, workload: { pid: 1, running: true, cmd: 'x' } })).toThrow(/unknown field "cmd"/);
    expect(() => parseResult.health({ ...good.health, workload: { pid: 1, running: 'yes' } })).toThrow(/running/);
    expect(() => parseResult.health({ version: 1, uptimeMs: 1 })).toThrow(/workload/);
    for (const m of ['signal', 'stdin', 'resize', 'fresh', 'shutdown'] as const) {
      expect(parseResult[m]({})).toEqual({});
      expect(refusal(() => parseResult[m]({ x: 1 })).code).toBe('INVALID_ARGUMENT');
      expect(refusal(() => parseResult[m](null)).code).toBe('INVALID_ARGUMENT');
    }
  });

  it('bounds what the guest sends: ids, signal names, exit codes, counts, pids and base64', () => {
    refused(() => parseEvent.execExit({ execId: 'x'.repeat(129), exitCode: 0, signal: null }), /execId must be a string of at most 128/);
    refused(() => parseEvent.output({ execId: 'x'.repeat(129), stream: 'stdout', data: '' }), /execId/);
    refused(() => parseEvent.exit({ exitCode: null, signal: `SIG${'X'.repeat(30)}` }), /signal/);
    refused(() => parseEvent.exit({ exitCode: null, signal: 'SIGKILL\n' }), /signal/);
    refused(() => parseEvent.exit({ exitCode: null, signal: 'toString' }), /signal/);
    refused(() => parseEvent.exit({ exitCode: 256, signal: null }), /exitCode must be between 0 and 255/);
    refused(() => parseEvent.exit({ exitCode: -1, signal: null }), /exitCode/);
    refused(() => parseEvent.exit({ exitCode: 0 }), /signal/);
    refused(() => parseEvent.exit({ exitCode: 0, signal: null, bytes: { stdout: -1, stderr: 0 } }), /bytes.stdout/);
    refused(() => parseEvent.exit({ exitCode: 0, signal: null, bytes: { stdout: 1.5, stderr: 0 } }), /bytes.stdout/);
    refused(() => parseEvent.exit({ exitCode: 0, signal: null, truncated: 'yes' }), /truncated/);
    refused(() => parseEvent.execExit({ execId: 'e', exitCode: 0, signal: null, durationMs: -5 }), /durationMs/);
    refused(() => parseEvent.output({ stream: 'stdout', data: 'not base64!' }), /data must be base64/);
    refused(() => parseEvent.output({ stream: 'stdout', data: 'aGk' }), /base64/);
    refused(() => parseEvent.output({ stream: 'stdout', data: 'A'.repeat((16 << 20) + 4) }), /data must be a string of at most/);
    refused(() => parseEvent.ready({ version: -1 }), /version/);
    refused(() => parseResult.run({ pid: 0, startedAtMs: 1 }), /pid/);
    refused(() => parseResult.exec({ pid: 2 ** 23 }), /pid/);
    expect(parseEvent.exit({ exitCode: null, signal: `SIG${'X'.repeat(29)}` }).signal).toHaveLength(32);
    const big = Buffer.alloc(12 << 20).toString('base64');
    expect(parseEvent.output({ stream: 'stdout', data: big }).data).toHaveLength(16 << 20);
  });

  it("parses a guest's process list strictly and bounded", () => {
    const proc = { pid: 7, ppid: 1, uid: 0, state: 'S', rssKiB: 900, cpuMs: 10, startedAfterBootMs: 400, command: 'sleep 600' };
    expect(parseResult.ps({ processes: [proc] })).toEqual({ processes: [proc] });
    expect(parseResult.ps({ processes: [], truncated: true })).toEqual({ processes: [], truncated: true });
    refused(() => parseResult.ps({ processes: Array.from({ length: 4097 }, () => proc) }), /at most 4096/);
    refused(() => parseResult.ps({ processes: [{ ...proc, state: 'SS' }] }), /state/);
    refused(() => parseResult.ps({ processes: [{ ...proc, state: '\n' }] }), /state must be one letter/);
    refused(() => parseResult.ps({ processes: [{ ...proc, command: 'x'.repeat(4097) }] }), /command/);
    refused(() => parseResult.ps({ processes: [{ ...proc, pid: -1 }] }), /pid/);
    refused(() => parseResult.ps({ processes: [{ ...proc, extra: 1 }] }), /unknown field "extra"/);
    refused(() => parseResult.ps({ processes: 'all' }), /processes must be an array/);
  });

  it('run and exec take the same process fields; signal and resize may name the workload or a group', () => {
    const run = parseParams.run({ command: ['id'], env: {}, user: '1000:1000', stdin: true, tty: { rows: 5, cols: 6 }, workdir: '/w' });
    expect(run).toEqual({ command: ['id'], env: {}, user: '1000:1000', stdin: true, tty: { rows: 5, cols: 6 }, workdir: '/w' });
    expect(parseParams.exec({ execId: 'e', command: ['id'], user: 'app' })).toEqual({ execId: 'e', command: ['id'], env: {}, user: 'app' });
    expect(parseParams.signal({ signal: 'SIGKILL', group: true })).toEqual({ signal: 'SIGKILL', group: true });
    expect(parseParams.resize({ rows: 2, cols: 3 })).toEqual({ rows: 2, cols: 3 });
    expect(() => parseParams.run({ command: ['id'], user: 'x'.repeat(257) })).toThrow(/user/);
  });

  it('names an unknown field in a short, quoted form (its name is the guest text)', () => {
    const err = refusal(() => parseEvent.ready({ version: 1, ['\n'.repeat(1000)]: 1 }));
    expect(err.message.length).toBeLessThan(500);
    expect(err.message).not.toContain('\n');
  });
});

function refused(f: () => unknown, pattern: RegExp): void {
  const err = refusal(f);
  expect(err.code).toBe('INVALID_ARGUMENT');
  expect(err.message).toMatch(pattern);
}

function refusal(f: () => unknown): AegisError {
  try {
    f();
  } catch (err) {
    expect(err).toBeInstanceOf(AegisError);
    return err as AegisError;
  }
  throw new Error('accepted what it should refuse');
}
