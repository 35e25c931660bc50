/**
 * Durations as people write them, shared by the CLI's flags (`--timeout`, `--idle-pause`) and
 * the daemon's settings (`AEGIS_IDLE_PAUSE`), so both read and print them alike.
 */
import { AegisError } from './errors.js';

const UNITS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;
const YEAR_MS = 31_536_000_000;

/** `500ms`, `90s`, `10m`, `2h`, `1d`, or a bare number of seconds; `0` is none. In ms, at most a year. */
export function parseDurationMs(v: string, what?: string): number {
  const m = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(v.trim());
  const named = what ? `${what}="${v}"` : `"${v}"`;
  if (!m?.[1]) throw new AegisError('INVALID_ARGUMENT', `${named} is not a duration: use e.g. 90s, 10m, 2h, 1500ms, or 0 for none`);
  const ms = Math.round(Number(m[1]) * UNITS[(m[2] ?? 's') as keyof typeof UNITS]);
  if (ms > YEAR_MS) throw new AegisError('INVALID_ARGUMENT', `${named} is over a year`);
  return ms;
}

/** A duration in ms in its shortest exact spelling, as parseDurationMs reads it: `90s`, `5m`, `1500ms`. */
export function formatDurationMs(ms: number): string {
  for (const [unit, size] of [
    ['d', UNITS.d],
    ['h', UNITS.h],
    ['m', UNITS.m],
    ['s', UNITS.s],
  ] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}
