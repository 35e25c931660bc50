/**
 * How long the daemon's event loop is held up (a stalled loop delays every API call and every
 * VM's channel). A 20 ms timer records how late it fires; the figures cover a sliding window
 * of the last 10–20 s and are reported by `status`, so stress runs and users can see them.
 */
import { createHistogram, type RecordableHistogram } from 'node:perf_hooks';
import type { ApiSchemas } from '@aegis/protocol/api';

const TICK_MS = 20;
const WINDOW_MS = 10_000;

/** The figures as `status` shows them (`windowMs`: over how long they were measured). */
export type LoopDelay = ApiSchemas['Status']['eventLoopDelayMs'];

export class LoopDelayMonitor {
  private current: RecordableHistogram = createHistogram();
  private previous: RecordableHistogram = createHistogram();
  private windowStart = Date.now();
  private previousStart = Date.now();
  private readonly timer: NodeJS.Timeout;

  constructor() {
    let expected = performance.now() + TICK_MS;
    this.timer = setInterval(() => {
      const now = performance.now();
      // Recorded in microseconds (the histogram takes integers >= 1).
      this.current.record(Math.max(1, Math.round((now - expected) * 1000)));
      expected = now + TICK_MS;
      if (Date.now() - this.windowStart >= WINDOW_MS) {
        this.previous = this.current;
        this.previousStart = this.windowStart;
        this.current = createHistogram();
        this.windowStart = Date.now();
      }
    }, TICK_MS);
    this.timer.unref();
  }

  read(): LoopDelay {
    const h = createHistogram();
    h.add(this.previous);
    h.add(this.current);
    const ms = (us: number): number => Math.round(us / 100) / 10;
    const empty = h.count === 0;
    return {
      p50Ms: empty ? 0 : ms(h.percentile(50)),
      p99Ms: empty ? 0 : ms(h.percentile(99)),
      maxMs: empty ? 0 : ms(h.max),
      windowMs: Date.now() - this.previousStart,
    };
  }

  stop(): void {
    clearInterval(this.timer);
  }
}
