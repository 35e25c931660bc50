/**
 * A queue between a producer that must not wait (the guest's output, a poller) and one
 * consumer that is an async iterator (a Connect stream). `push` answers a promise while more
 * than `highWaterBytes` wait, so the producer can hold the guest back; `end` finishes it.
 */
export class Channel<T> implements AsyncIterable<T> {
  private readonly items: Array<{ value: T; size: number }> = [];
  private waiting: ((r: IteratorResult<T>) => void) | undefined;
  private failing: ((err: unknown) => void) | undefined;
  private ended = false;
  private error: unknown;
  private queuedBytes = 0;
  private drained: Array<() => void> = [];

  constructor(private readonly highWaterBytes = 1 << 20) {}

  /** Queues `value`; a promise while the consumer is behind (resolved once it caught up or left). */
  push(value: T, size = 0): Promise<void> | undefined {
    if (this.ended) return undefined;
    if (this.waiting) {
      const w = this.waiting;
      this.waiting = undefined;
      this.failing = undefined;
      w({ value, done: false });
      return undefined;
    }
    this.items.push({ value, size });
    this.queuedBytes += size;
    if (this.queuedBytes <= this.highWaterBytes) return undefined;
    return new Promise((resolve) => this.drained.push(resolve));
  }

  /** No more values; with `err`, the consumer's next read throws it. */
  end(err?: unknown): void {
    if (this.ended) return;
    this.ended = true;
    this.error = err;
    if (this.waiting) {
      const w = this.waiting;
      const f = this.failing;
      this.waiting = undefined;
      this.failing = undefined;
      if (err !== undefined && f) f(err);
      else w({ value: undefined, done: true });
    }
    this.release();
  }

  get isEnded(): boolean {
    return this.ended;
  }

  private release(): void {
    const d = this.drained;
    this.drained = [];
    for (const r of d) r();
  }

  next(): Promise<IteratorResult<T>> {
    const item = this.items.shift();
    if (item) {
      this.queuedBytes -= item.size;
      if (this.queuedBytes <= this.highWaterBytes / 2) this.release();
      return Promise.resolve({ value: item.value, done: false });
    }
    if (this.ended) return this.error !== undefined ? Promise.reject(this.error) : Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.waiting = resolve;
      this.failing = reject;
    });
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return { next: () => this.next(), return: () => (this.end(), Promise.resolve({ value: undefined, done: true })) };
  }
}
