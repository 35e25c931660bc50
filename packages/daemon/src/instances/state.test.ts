import { describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { INSTANCE_STATES, LIVE_STATES, canTransition, isLive, isUp, requireState, type InstanceState } from './state.js';

const TERMINAL: readonly InstanceState[] = ['stopped', 'failed'];

function catchError(fn: () => void): unknown {
  try {
    fn();
  } catch (err) {
    return err;
  }
  throw new Error('expected the call to throw');
}

describe('instance state table', () => {
  it('lists seven distinct states', () => {
    expect(new Set(INSTANCE_STATES).size).toBe(INSTANCE_STATES.length);
    expect([...INSTANCE_STATES].sort()).toEqual(['failed', 'hibernated', 'paused', 'running', 'starting', 'stopped', 'stopping']);
  });

  it('hibernates only a running instance, and wakes it to running or ends it where it lies', () => {
    for (const s of INSTANCE_STATES) expect(canTransition(s, 'hibernated'), `${s} -> hibernated`).toBe(s === 'running');
    expect(INSTANCE_STATES.filter((to) => canTransition('hibernated', to)).sort()).toEqual(['failed', 'running', 'stopped']);
    expect(isLive('hibernated')).toBe(false); // no VM process
    expect(isUp('hibernated')).toBe(true); // but it holds its volumes, image, ports and deadline
  });

  it('has an entry for every state, so canTransition never throws', () => {
    for (const from of INSTANCE_STATES) {
      for (const to of INSTANCE_STATES) {
        expect(typeof canTransition(from, to)).toBe('boolean');
      }
    }
  });

  it('allows nothing out of a terminal state but a restart (back to starting)', () => {
    for (const from of TERMINAL) {
      for (const to of INSTANCE_STATES) {
        expect(canTransition(from, to), `${from} -> ${to}`).toBe(to === 'starting');
      }
    }
  });

  it('lets every non-terminal state reach both terminal states, directly or through stopping', () => {
    for (const from of INSTANCE_STATES.filter((s) => !TERMINAL.includes(s))) {
      expect(canTransition(from, 'failed'), `${from} -> failed`).toBe(true);
      expect(canTransition(from, 'stopped') || canTransition(from, 'stopping'), `${from} -> stopped`).toBe(true);
    }
  });

  it('never allows a state to transition to itself', () => {
    for (const s of INSTANCE_STATES) expect(canTransition(s, s), s).toBe(false);
  });

  it('refuses to bring a stopped or failed instance back to running', () => {
    expect(canTransition('stopped', 'running')).toBe(false);
    expect(canTransition('failed', 'running')).toBe(false);
  });

  it('allows the ordinary lifecycle: start, pause, resume, stop', () => {
    expect(canTransition('starting', 'running')).toBe(true);
    expect(canTransition('running', 'paused')).toBe(true);
    expect(canTransition('paused', 'running')).toBe(true);
    expect(canTransition('running', 'stopping')).toBe(true);
    expect(canTransition('stopping', 'stopped')).toBe(true);
  });

  it('refuses going back to starting from a live state, pausing a non-running instance, and a paused instance stopping without stopping first', () => {
    for (const s of INSTANCE_STATES.filter(isLive)) expect(canTransition(s, 'starting'), `${s} -> starting`).toBe(false);
    expect(canTransition('starting', 'paused')).toBe(false);
    expect(canTransition('stopping', 'paused')).toBe(false);
    expect(canTransition('stopping', 'running')).toBe(false);
    expect(canTransition('paused', 'stopped')).toBe(false);
  });
});

describe('isLive', () => {
  it('is true exactly for the states in which a VM process may exist', () => {
    expect(INSTANCE_STATES.filter(isLive)).toEqual(['starting', 'running', 'paused', 'stopping']);
    expect([...LIVE_STATES].sort()).toEqual(INSTANCE_STATES.filter(isLive).sort());
  });

  it('is false for both terminal states', () => {
    for (const s of TERMINAL) expect(isLive(s)).toBe(false);
  });
});

describe('requireState', () => {
  it('returns quietly when the state is allowed', () => {
    expect(() => requireState('web', 'running', ['running', 'paused'], 'exec in')).not.toThrow();
  });

  it('throws FAILED_PRECONDITION naming the operation, the handle and the state', () => {
    const err = catchError(() => requireState('web', 'stopped', ['running'], 'exec in'));
    expect(err).toBeInstanceOf(AegisError);
    expect((err as AegisError).code).toBe('FAILED_PRECONDITION');
    expect((err as AegisError).httpStatus).toBe(409);
    expect((err as AegisError).message).toMatch(/^cannot exec in instance "web": it is stopped/);
  });

  it('adds a hint about what to do instead', () => {
    const cases: [InstanceState, RegExp][] = [
      ['starting', /wait for it to finish starting/],
      ['paused', /resume it first: aegis instance resume h$/],
      ['stopping', /on its way down$/],
      ['stopped', /start it again with aegis start h, or run a new one$/],
      ['failed', /see why with aegis inspect h, then start it again or delete it$/],
      ['hibernated', /it wakes on use .* or with aegis instance resume h$/],
    ];
    for (const [state, hint] of cases) {
      const err = catchError(() => requireState('h', state, ['running'], 'pause')) as AegisError;
      expect(err.message, state).toMatch(new RegExp(`it is ${state}; `));
      expect(err.message, state).toMatch(hint);
    }
  });

  it('omits the hint separator for a state that has no hint', () => {
    const err = catchError(() => requireState('h', 'running', ['paused'], 'resume')) as AegisError;
    expect(err.code).toBe('FAILED_PRECONDITION');
    expect(err.message).toBe('cannot resume instance "h": it is running');
  });

  it('refuses every state when nothing is allowed', () => {
    for (const s of INSTANCE_STATES) {
      expect(() => requireState('h', s, [], 'touch')).toThrow(AegisError);
    }
  });
});
