/**
 * Instance deadlines (`--timeout`, the SDK's `timeoutMs`): agent runs leak sandboxes when the
 * host program dies, so every instance may carry a time after which it is stopped whoever is
 * still around. The time lives in the registry (it survives an aegisd restart); this keeps one
 * timer per instance in memory, re-armed from the registry at start-up.
 */
/** setTimeout's longest delay (about 24.8 days); a later deadline is re-armed when this fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;

export class Deadlines {
  private readonly timers = new Map<string, NodeJS.Timeout>();

  constructor(private readonly onDeadline: (id: string) => void) {}

  /** (Re)arms `id` to fire at `atMs` (epoch ms); a time already past fires at once. */
  arm(id: string, atMs: number): void {
    this.clear(id);
    const wait = Math.max(0, atMs - Date.now());
    const timer = setTimeout(
      () => {
        this.timers.delete(id);
        if (Date.now() < atMs) this.arm(id, atMs);
        else this.onDeadline(id);
      },
      Math.min(wait, MAX_TIMER_MS),
    );
    timer.unref();
    this.timers.set(id, timer);
  }

  clear(id: string): void {
    clearTimeout(this.timers.get(id));
    this.timers.delete(id);
  }

  clearAll(): void {
    for (const t of this.timers.values()) clearTimeout(t);
    this.timers.clear();
  }
}
