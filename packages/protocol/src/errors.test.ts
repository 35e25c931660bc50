import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { AegisError } from './errors.js';

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => expect.fail('expected a rejection'),
    (err: unknown) => err,
  );
}

describe('AegisError.from', () => {
  it('turns an aborted operation into CANCELLED instead of INTERNAL', async () => {
    const controller = new AbortController();
    controller.abort();
    let thrown: unknown;
    try {
      controller.signal.throwIfAborted();
    } catch (err) {
      thrown = err;
    }
    const aborts: unknown[] = [
      thrown,
      AbortSignal.abort().reason,
      new DOMException('stopped', 'AbortError'),
      // Node's own AbortError, a different class with the same name.
      await rejection(sleep(10, undefined, { signal: AbortSignal.abort() })),
      // Already aborted: rejects before any connection is attempted.
      await rejection(fetch('http://127.0.0.1:9/', { signal: AbortSignal.abort() })),
    ];
    for (const err of aborts) {
      const e = AegisError.from(err);
      expect(e.code).toBe('CANCELLED');
      expect(e.cause).toBe(err);
    }
  });

  it('turns an AbortSignal.timeout() expiry into TIMEOUT instead of INTERNAL', async () => {
    const signal = AbortSignal.timeout(1);
    await new Promise((r) => signal.addEventListener('abort', r, { once: true }));
    expect(AegisError.from(signal.reason).code).toBe('TIMEOUT');
    // Node's APIs report it as an AbortError whose cause is the TimeoutError.
    const wrapped = await rejection(sleep(1_000, undefined, { signal: AbortSignal.timeout(1) }));
    expect(wrapped).toHaveProperty('name', 'AbortError');
    expect(AegisError.from(wrapped).code).toBe('TIMEOUT');
  });

  it('lets an abort win over an explicit code, which describes failures and an abort is none', () => {
    expect(AegisError.from(new DOMException('stopped', 'AbortError'), 'INVALID_ARGUMENT').code).toBe('CANCELLED');
    expect(AegisError.from(new DOMException('too slow', 'TimeoutError'), 'UNAVAILABLE').code).toBe('TIMEOUT');
  });

  it('still wraps other errors with the given code, or INTERNAL', () => {
    expect(AegisError.from(new Error('boom')).code).toBe('INTERNAL');
    expect(AegisError.from(new TypeError('bad'), 'INVALID_ARGUMENT').code).toBe('INVALID_ARGUMENT');
    expect(AegisError.from('AbortError').code).toBe('INTERNAL');
    const own = new AegisError('NOT_FOUND', 'gone');
    expect(AegisError.from(own, 'INTERNAL')).toBe(own);
  });
});
