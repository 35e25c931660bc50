/**
 * Instance states: one closed union, and every legal transition in one table. Anything not
 * in the table is refused with FAILED_PRECONDITION and a hint about what to do instead.
 */
import { AegisError } from '@aegis/protocol';

export const INSTANCE_STATES = ['starting', 'running', 'paused', 'stopping', 'stopped', 'failed'] as const;
export type InstanceState = (typeof INSTANCE_STATES)[number];

const TRANSITIONS: Record<InstanceState, readonly InstanceState[]> = {
  starting: ['running', 'stopping', 'stopped', 'failed'],
  running: ['paused', 'stopping', 'stopped', 'failed'],
  paused: ['running', 'stopping', 'failed'],
  stopping: ['stopped', 'failed'],
  // A restart boots a new VM for the same instance.
  stopped: ['starting'],
  failed: ['starting'],
};

/** States in which a VM process may exist. */
export const LIVE_STATES: readonly InstanceState[] = ['starting', 'running', 'paused', 'stopping'];

export function isLive(state: InstanceState): boolean {
  return LIVE_STATES.includes(state);
}

export function canTransition(from: InstanceState, to: InstanceState): boolean {
  return TRANSITIONS[from].includes(to);
}

const HINTS: Partial<Record<InstanceState, string>> = {
  starting: 'wait for it to finish starting',
  paused: 'resume it first (aegis instance resume)',
  stopping: 'it is already stopping',
  stopped: 'it has stopped; restart it (aegis instance restart) or start a new one',
  failed: 'it has failed; see aegis instance info, then restart or delete it',
};

/** Throws FAILED_PRECONDITION unless `state` is one of `allowed` for operation `op`. */
export function requireState(handle: string, state: InstanceState, allowed: readonly InstanceState[], op: string): void {
  if (allowed.includes(state)) return;
  const hint = HINTS[state];
  throw new AegisError('FAILED_PRECONDITION', `cannot ${op} instance "${handle}": it is ${state}${hint ? `; ${hint}` : ''}`);
}
