/**
 * Instance deadlines (`--timeout`, the SDK's `timeoutMs`): agent runs leak sandboxes when the
 * host program dies, so every instance may carry a time after which it is stopped whoever is
 * still around. The time lives in the registry (it survives an aegisd restart); each instance
 * keeps its timer in memory, re-armed from the registry at start-up.
 */
/** setTimeout's longest delay (about 24.8 days); a later deadline is re-armed when this fires. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** One instance's deadline timer. */
export class DeadlineTimer {
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly onDeadline: () => void) {}

  /** (Re)arms it to fire at `atMs` (epoch ms); a time already past fires at once. */
  arm(atMs: number): void {
    this.clear();
    const wait = Math.max(0, atMs - Date.now());
    this.timer = setTimeout(
      () => {
        this.timer = undefined;
        if (Date.now() < atMs) this.arm(atMs);
        else this.onDeadline();
      },
      Math.min(wait, MAX_TIMER_MS),
    );
    this.timer.unref();
  }

  clear(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}
