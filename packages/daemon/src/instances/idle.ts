/**
 * Idle pause (`--idle-pause`, `idlePauseMs`, AEGIS_IDLE_PAUSE): an instance nobody uses for its
 * idle time — no exec in flight, no output from the workload or an exec, no files call, no
 * byte either way through an exposed port — is paused (QMP `stop`: no CPU, only its memory),
 * and woken transparently by the next use: an exec, `logs --follow`, a files call, a new
 * connection or bytes from the host on an open one. The caller waits for the resume; nothing is
 * refused. A user's `pause` is not an idle pause and is never woken by use.
 *
 * This file holds the clock (one per instance, in memory) and the rules; the owner
 * (instance.ts) pauses and wakes through its operation queue, so several wakers at
 * once resume it once. Whether an instance is idle-paused is in the registry, in its state
 * reason (written with the state in one compare-and-set), so it survives an aegisd restart.
 */
import { AegisError, formatDurationMs } from '@aegis/protocol';
import type { InstanceRow } from '../registry/db.js';

/** Shortest idle time: a pause and a resume cost milliseconds each, and a shorter one would thrash. */
export const MIN_IDLE_PAUSE_MS = 1000;
/** Longest: a year, as deadlines. */
export const MAX_IDLE_PAUSE_MS = 31_536_000_000;

const REASON_PREFIX = 'idle for ';

/** The state reason of an idle pause: why it is paused, and what wakes it. */
export function idleReason(idlePauseMs: number): string {
  return `${REASON_PREFIX}${formatDurationMs(idlePauseMs)}; wakes on exec, logs --follow, files or a connection`;
}

/** Paused because nobody used it (woken by use), not by a user's `pause` (never woken by use). */
export function isIdlePaused(row: Pick<InstanceRow, 'state' | 'stateReason'>): boolean {
  return row.state === 'paused' && row.stateReason?.startsWith(REASON_PREFIX) === true;
}

/** Throws INVALID_ARGUMENT unless `ms` is 0 (off) or between MIN_IDLE_PAUSE_MS and a year. */
export function checkIdlePauseMs(ms: number, what = 'idlePauseMs'): void {
  if (ms === 0 || (Number.isInteger(ms) && ms >= MIN_IDLE_PAUSE_MS && ms <= MAX_IDLE_PAUSE_MS)) return;
  throw new AegisError('INVALID_ARGUMENT', `${what} must be 0 (off) or from 1s to a year, not ${ms} ms`);
}

/**
 * One instance's idle clock: armed while it runs with an idle time. A use only records the
 * time (no timer is reset per byte); the timer, when it fires early, waits for the rest.
 */
export class IdleClock {
  private idleMs = 0;
  /** Last use, epoch ms. */
  private lastMs = Date.now();
  /** Uses in progress (execs, files calls): never idle while any runs. */
  private busy = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly onIdle: () => void) {}

  /** Starts (or restarts) the clock: idle `idleMs` from now unless used. */
  arm(idleMs: number): void {
    this.idleMs = idleMs;
    this.lastMs = Date.now();
    this.schedule();
  }

  /** Stops the clock (paused, stopped, deleted); uses in progress keep their count for the next arm. */
  disarm(): void {
    this.idleMs = 0;
    this.schedule();
  }

  /** A use: the idle time starts again from now. */
  touch(): void {
    this.lastMs = Date.now();
  }

  /**
   * A use that lasts (an exec, a files call): not idle until the returned function is called
   * (once is enough; more are ignored).
   */
  hold(): () => void {
    this.busy++;
    this.schedule();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.busy--;
      this.lastMs = Date.now();
      this.schedule();
    };
  }

  /** True when armed, nothing is in progress, and it has not been used for its idle time. */
  isIdle(): boolean {
    return this.idleMs > 0 && this.busy === 0 && Date.now() - this.lastMs >= this.idleMs;
  }

  /** Looked at too early (a use came meanwhile): waits for the rest of the idle time again. */
  reschedule(): void {
    this.schedule();
  }

  private schedule(): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    if (this.idleMs === 0 || this.busy > 0) return; // a release schedules it again
    const wait = Math.max(0, this.lastMs + this.idleMs - Date.now());
    this.timer = setTimeout(() => {
      this.timer = undefined;
      if (this.busy > 0 || this.idleMs === 0) return;
      if (Date.now() - this.lastMs < this.idleMs) this.schedule();
      else this.onIdle();
    }, wait);
    this.timer.unref();
  }
}
