/**
 * Two connected in-memory byte streams: what one writes, the other reads, with backpressure
 * (a write completes once the other side's reader has taken the chunk in), end() as EOF on the
 * other side, and destroy() before both directions finished ending both. What a socketpair would be, without a file descriptor:
 * the daemon hands one end to the data channel and keeps the other (a file transfer).
 */
import { Duplex } from 'node:stream';

export function duplexPair(): [Duplex, Duplex] {
  const ends: Duplex[] = [];
  /** A write waiting for the peer's reader to want more. */
  const waiting: (((err?: Error | null) => void) | undefined)[] = [undefined, undefined];
  const make = (self: number, peer: number): Duplex =>
    new Duplex({
      read() {
        // Our reader wants more: the peer's write that pushed last may complete.
        const cb = waiting[peer];
        waiting[peer] = undefined;
        cb?.();
      },
      write(chunk: Buffer, _enc, cb) {
        const p = ends[peer];
        if (!p || p.destroyed) return cb(new Error('the other end is closed'));
        if (p.push(chunk)) cb();
        else waiting[self] = cb;
      },
      final(cb) {
        const p = ends[peer];
        if (p && !p.destroyed) p.push(null);
        cb();
      },
      destroy(err, cb) {
        const me = ends[self];
        const p = ends[peer];
        const w = waiting[self];
        waiting[self] = undefined;
        w?.(err ?? new Error('destroyed'));
        // A side that finished both ways is destroyed by autoDestroy: its peer may still hold
        // data for its own reader. Anything else (an error, an abort) ends both, as a reset would.
        const clean = !err && me?.readableEnded === true && me.writableFinished;
        if (!clean && p && !p.destroyed) p.destroy();
        cb(err);
      },
    });
  const a = make(0, 1);
  const b = make(1, 0);
  ends.push(a, b);
  return [a, b];
}
