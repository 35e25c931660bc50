/**
 * Idle pause (`--idle-pause`, `idlePauseMs`, AEGIS_IDLE_PAUSE): an instance nobody uses for its
 * idle time — no exec in flight, no output from the workload or an exec, no files call, no
 * byte either way through an exposed port — is paused (QMP `stop`: no CPU, only its memory),
 * and woken transparently by the next use: an exec, `logs --follow`, a files call, a new
 * connection or bytes from the host on an open one. The caller waits for the resume; nothing is
 * refused. A user's `pause` is not an idle pause and is never woken by use.
 *
 * This file holds the timers (one per instance, in memory) and the rules; the owner
 * (manager.ts) pauses and wakes through the instance's operation queue, so several wakers at
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

interface Watch {
  idleMs: number;
  /** Last use, epoch ms. */
  lastMs: number;
  /** Uses in progress (execs, files calls): never idle while any runs. */
  busy: number;
  timer: NodeJS.Timeout | undefined;
}

/**
 * One idle timer per running instance that asked for idle pause. A use only records the time
 * (no timer is reset per byte); the timer, when it fires early, waits for the rest.
 */
export class IdleTimers {
  private readonly watched = new Map<string, Watch>();

  constructor(private readonly onIdle: (id: string) => void) {}

  /** Starts (or restarts) watching `id`: it is idle `idleMs` from now unless used. */
  arm(id: string, idleMs: number): void {
    const w = this.watched.get(id);
    if (w) {
      w.idleMs = idleMs;
      w.lastMs = Date.now();
      this.schedule(id, w);
      return;
    }
    const fresh: Watch = { idleMs, lastMs: Date.now(), busy: 0, timer: undefined };
    this.watched.set(id, fresh);
    this.schedule(id, fresh);
  }

  /** Stops watching (paused, stopped, deleted); uses in progress keep their count if re-armed. */
  disarm(id: string): void {
    const w = this.watched.get(id);
    if (!w) return;
    clearTimeout(w.timer);
    w.timer = undefined;
    if (w.busy === 0) this.watched.delete(id);
    else w.idleMs = 0; // kept for its busy count; armed again by `arm`
  }

  /** A use: the idle time starts again from now. */
  touch(id: string): void {
    const w = this.watched.get(id);
    if (w) w.lastMs = Date.now();
  }

  /**
   * A use that lasts (an exec, a files call): the instance is not idle until the returned
   * function is called (once is enough; more are ignored).
   */
  hold(id: string): () => void {
    let w = this.watched.get(id);
    if (!w) {
      w = { idleMs: 0, lastMs: Date.now(), busy: 0, timer: undefined };
      this.watched.set(id, w);
    }
    const held = w;
    held.busy++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      held.busy--;
      held.lastMs = Date.now();
      if (this.watched.get(id) !== held) return;
      if (held.idleMs === 0 && held.busy === 0) this.watched.delete(id);
      else if (held.busy === 0) this.schedule(id, held);
    };
  }

  /** True when `id` is watched, nothing is in progress, and it has not been used for its idle time. */
  isIdle(id: string): boolean {
    const w = this.watched.get(id);
    return w !== undefined && w.idleMs > 0 && w.busy === 0 && Date.now() - w.lastMs >= w.idleMs;
  }

  /** Looked at too early (a use came meanwhile): waits for the rest of the idle time again. */
  reschedule(id: string): void {
    const w = this.watched.get(id);
    if (w) this.schedule(id, w);
  }

  clearAll(): void {
    for (const w of this.watched.values()) clearTimeout(w.timer);
    this.watched.clear();
  }

  private schedule(id: string, w: Watch): void {
    clearTimeout(w.timer);
    w.timer = undefined;
    if (w.idleMs === 0 || w.busy > 0) return; // a release schedules it again
    const wait = Math.max(0, w.lastMs + w.idleMs - Date.now());
    w.timer = setTimeout(() => {
      w.timer = undefined;
      if (this.watched.get(id) !== w || w.busy > 0 || w.idleMs === 0) return;
      if (Date.now() - w.lastMs < w.idleMs) this.schedule(id, w);
      else this.onIdle(id);
    }, wait);
    w.timer.unref();
  }
}
