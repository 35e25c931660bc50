/**
 * Instance states: one closed union, and every legal transition in one table. Anything not
 * in the table is refused with FAILED_PRECONDITION and a hint about what to do instead.
 */
import { AegisError } from '@aegis/protocol';

export const INSTANCE_STATES = ['starting', 'running', 'paused', 'stopping', 'stopped', 'failed', 'hibernated'] as const;
export type InstanceState = (typeof INSTANCE_STATES)[number];

const TRANSITIONS: Record<InstanceState, readonly InstanceState[]> = {
  starting: ['running', 'stopping', 'stopped', 'failed'],
  running: ['paused', 'stopping', 'stopped', 'failed', 'hibernated'],
  paused: ['running', 'stopping', 'failed'],
  stopping: ['stopped', 'failed'],
  // A restart boots a new VM for the same instance.
  stopped: ['starting'],
  failed: ['starting'],
  // Its memory and devices on disk, no VMM: woken (restored) by use, or stopped where it lies.
  hibernated: ['running', 'stopped', 'failed'],
};

/** States in which a VM process may exist. */
export const LIVE_STATES: readonly InstanceState[] = ['starting', 'running', 'paused', 'stopping'];

export function isLive(state: InstanceState): boolean {
  return LIVE_STATES.includes(state);
}

/**
 * Live, or hibernated: it holds what a running instance holds (its volumes, its image, its
 * deadline and host ports) though no VM process runs.
 */
export function isUp(state: InstanceState): boolean {
  return isLive(state) || state === 'hibernated';
}

export function canTransition(from: InstanceState, to: InstanceState): boolean {
  return TRANSITIONS[from].includes(to);
}

/** What to do instead, said once, with the command (the state itself is already in the message). */
const HINTS: Partial<Record<InstanceState, (handle: string) => string>> = {
  starting: () => 'wait for it to finish starting',
  paused: (h) => `resume it first: aegis instance resume ${h}`,
  stopping: () => 'it is on its way down',
  stopped: (h) => `start it again with aegis start ${h}, or run a new one`,
  failed: (h) => `see why with aegis inspect ${h}, then start it again or delete it`,
  hibernated: (h) => `it wakes on use (exec, cp, logs -f, a connection to its ports) or with aegis instance resume ${h}`,
};

/** Throws FAILED_PRECONDITION unless `state` is one of `allowed` for operation `op`. */
export function requireState(handle: string, state: InstanceState, allowed: readonly InstanceState[], op: string): void {
  if (allowed.includes(state)) return;
  const hint = HINTS[state]?.(handle);
  throw new AegisError('FAILED_PRECONDITION', `cannot ${op} instance "${handle}": it is ${state}${hint ? `; ${hint}` : ''}`);
}
