import { describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { OpQueue } from './op-queue.js';

const tick = (ms = 5): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('OpQueue', () => {
  it('runs operations one at a time, in the order they were queued', async () => {
    const q = new OpQueue();
    const log: string[] = [];
    const op = (name: string, ms: number) => () =>
      q.run(name, async () => {
        log.push(`${name} in`);
        await tick(ms);
        log.push(`${name} out`);
      });
    await Promise.all([op('a', 20)(), op('b', 1)(), op('c', 5)()]);
    expect(log).toEqual(['a in', 'a out', 'b in', 'b out', 'c in', 'c out']);
  });

  it('cancels the named operation in flight, which then fails with CANCELLED, and the next one runs', async () => {
    const q = new OpQueue();
    const start = q.run(
      'start',
      (signal) => new Promise((_, reject) => signal.addEventListener('abort', () => reject(signal.reason as Error))),
    );
    await tick();
    expect(q.cancel(['start'], 'cancelled by stop')).toBe(true);
    const stop = q.run('stop', async () => 'stopped');
    await expect(start).rejects.toMatchObject({ code: 'CANCELLED', message: 'cancelled by stop' });
    await expect(stop).resolves.toBe('stopped');
  });

  it('does not cancel an operation that is not named', async () => {
    const q = new OpQueue();
    const pause = q.run('pause', async () => {
      await tick(10);
      return 'paused';
    });
    await tick();
    expect(q.cancel(['start'], 'no')).toBe(false);
    await expect(pause).resolves.toBe('paused');
  });

  it('a failing operation does not block the queue, and its error keeps its code', async () => {
    const q = new OpQueue();
    const bad = q.run('x', async () => {
      throw new AegisError('FAILED_PRECONDITION', 'no');
    });
    const good = q.run('y', async () => 1);
    await expect(bad).rejects.toMatchObject({ code: 'FAILED_PRECONDITION' });
    await expect(good).resolves.toBe(1);
  });

  it('an operation whose caller went away before its turn never runs', async () => {
    const q = new OpQueue();
    let ran = false;
    const first = q.run('a', () => tick(20));
    const caller = new AbortController();
    const second = q.run(
      'b',
      async () => {
        ran = true;
      },
      caller.signal,
    );
    caller.abort();
    await first;
    await expect(second).rejects.toMatchObject({ code: 'CANCELLED' });
    expect(ran).toBe(false);
  });

  it('after close, queued and later operations fail with the closing error', async () => {
    const q = new OpQueue();
    const first = q.run('delete', async () => {
      await tick(10);
      q.close(new AegisError('NOT_FOUND', 'deleted'));
    });
    const queued = q.run('pause', async () => 'paused');
    await first;
    await expect(queued).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(q.run('resume', async () => 1)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});
