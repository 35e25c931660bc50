/**
 * One instance's operations, one at a time. Every operation that changes an instance (start,
 * stop, delete, pause, resume, restart, exec admission) runs through its queue, so two of them
 * never interleave (containerd's per-task mutex; a microVM monitor's single VMM thread). An operation
 * in flight that may be cut short (a start) is cancellable: a stop or delete queued behind it
 * aborts it first, and the start then undoes what it did before the next one runs.
 */
import { AegisError } from '@aegis/protocol';

export class OpQueue {
  private tail: Promise<unknown> = Promise.resolve();
  private inFlight: { op: string; controller: AbortController } | undefined;
  private closedWith: AegisError | undefined;

  /**
   * Runs `fn` after every operation queued before it. Its signal aborts when `cancel` names
   * it, when `outer` aborts (the API caller went away), or when the queue is closed.
   */
  run<T>(op: string, fn: (signal: AbortSignal) => Promise<T>, outer?: AbortSignal): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const result = this.tail.then(async () => {
      if (this.closedWith) throw this.closedWith;
      outer?.throwIfAborted();
      const controller = new AbortController();
      const onOuter = (): void => controller.abort(outer?.reason);
      outer?.addEventListener('abort', onOuter, { once: true });
      this.inFlight = { op, controller };
      try {
        return await fn(controller.signal);
      } finally {
        outer?.removeEventListener('abort', onOuter);
        this.inFlight = undefined;
      }
    });
    const settled = result.then(
      () => undefined,
      () => undefined,
    );
    this.tail = settled;
    return result.catch((err: unknown) => {
      throw AegisError.from(err);
    });
  }

  /** Aborts the operation in flight if it is one of `ops`; true when it did. */
  cancel(ops: readonly string[], reason: string): boolean {
    const f = this.inFlight;
    if (!f || !ops.includes(f.op) || f.controller.signal.aborted) return false;
    f.controller.abort(new AegisError('CANCELLED', reason));
    return true;
  }

  /** Refuses every later operation with `err` (the instance is gone). */
  close(err: AegisError): void {
    this.closedWith = err;
  }
}
