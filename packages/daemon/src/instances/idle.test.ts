/**
 * Idle pause with no VM: the timers alone, then the owner with a fake backend (an instance
 * paused for idleness, woken once by several callers at once, a user's pause left alone). The
 * same behaviour against real VMs is tests/integration/idle.test.ts.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { formatDurationMs, parseDurationMs } from '@aegis/protocol';
import { fakeDaemon, type FakeDaemon } from '../../../../tests/support/fake-daemon.js';
import type { FakeBackend, FakeVm } from '../../../../tests/support/fake-vmm.js';
import { codeOf } from '../../../../tests/support/rejection.js';
import { loadConfig } from '../config.js';
import { IdleClock, idleReason, isIdlePaused } from './idle.js';
import type { InstanceManager } from './manager.js';
import type { ExecEvent } from './spec.js';

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: string, ms = 3000): Promise<void> {
  for (let i = 0; i < ms / 10 && !cond(); i++) await sleep(10);
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

describe('idle clock', () => {
  it('fires once after the idle time; a use postpones it, a hold keeps it off until released', async () => {
    const fired: string[] = [];
    const a = new IdleClock(() => fired.push('a'));
    const b = new IdleClock(() => fired.push('b'));
    a.arm(60);
    b.arm(60);
    const hold = b.hold();
    await sleep(30);
    a.touch();
    await sleep(45);
    expect(fired).toEqual([]); // a was used 45 ms ago
    await sleep(40);
    expect(fired).toEqual(['a']);
    expect(a.isIdle()).toBe(true);
    expect(b.isIdle()).toBe(false); // held
    hold();
    hold(); // a second release is ignored
    await sleep(30);
    expect(fired).toEqual(['a']); // the idle time starts at the release
    await sleep(50);
    expect(fired).toEqual(['a', 'b']);
    a.disarm();
    b.disarm();
    const c = new IdleClock(() => fired.push('c'));
    c.arm(30);
    c.disarm();
    await sleep(50);
    expect(fired).toEqual(['a', 'b']);
  });

  it('durations: parsed as the CLI parses them, shown in their shortest spelling', () => {
    expect(parseDurationMs('1500ms', 'X')).toBe(1500);
    expect(parseDurationMs('30', 'X')).toBe(30_000);
    expect(parseDurationMs('5m', 'X')).toBe(300_000);
    expect(parseDurationMs('1h', 'X')).toBe(3_600_000);
    expect(() => parseDurationMs('soon', 'AEGIS_IDLE_PAUSE')).toThrow(/AEGIS_IDLE_PAUSE="soon" is not a duration/);
    expect(formatDurationMs(60_000)).toBe('1m');
    expect(formatDurationMs(90_000)).toBe('90s');
    expect(formatDurationMs(1500)).toBe('1500ms');
    expect(idleReason(60_000)).toBe('idle for 1m; wakes on exec, logs --follow, files or a connection');
    expect(isIdlePaused({ state: 'paused', stateReason: idleReason(2000) })).toBe(true);
    expect(isIdlePaused({ state: 'paused', stateReason: null })).toBe(false);
    expect(isIdlePaused({ state: 'running', stateReason: idleReason(2000) })).toBe(false);
  });

  it('AEGIS_IDLE_PAUSE: off unless set, a duration, refused when malformed or under 1 s', () => {
    expect(loadConfig({ AEGIS_HOME: '/x' }).defaultIdlePauseMs).toBe(0);
    expect(loadConfig({ AEGIS_HOME: '/x', AEGIS_IDLE_PAUSE: '5m' }).defaultIdlePauseMs).toBe(300_000);
    expect(loadConfig({ AEGIS_HOME: '/x', AEGIS_IDLE_PAUSE: '0' }).defaultIdlePauseMs).toBe(0);
    expect(() => loadConfig({ AEGIS_HOME: '/x', AEGIS_IDLE_PAUSE: 'later' })).toThrow(/not a duration/);
    expect(() => loadConfig({ AEGIS_HOME: '/x', AEGIS_IDLE_PAUSE: '10ms' })).toThrow(/0 \(off\) or from 1s/);
  });
});

describe('idle pause, fake backend', () => {
  let backend: FakeBackend;
  let m: InstanceManager;
  let fake: FakeDaemon;

  beforeEach(async () => {
    fake = await fakeDaemon('aegis-idle-');
    ({ backend, m } = fake);
  });

  afterEach(async () => {
    for (const i of m.list(true))
      await m
        .instance(i.id)
        .delete(true)
        .catch(() => undefined);
    m.detachAll();
    fake.close();
  });

  /** Counts the VM's resumes. */
  function countResumes(vm: FakeVm): () => number {
    let n = 0;
    const resume = vm.resume.bind(vm);
    vm.resume = async () => {
      n++;
      await sleep(20); // a resume takes a moment: wakers arriving meanwhile must not resume again
      await resume();
    };
    return () => n;
  }

  it('pauses after the idle time with the reason; several wakers at once resume once; the timer starts again', async () => {
    const inst = await m.create({ handle: 'w', command: ['sleep', '60'], idlePauseMs: 1000 });
    expect(inst.idlePauseMs).toBe(1000);
    const vm = backend.vms[0];
    if (!vm) throw new Error('no VM');
    const resumes = countResumes(vm);
    await sleep(600);
    expect(m.get('w').state).toBe('running');
    await until(() => m.get('w').state === 'paused', 'the idle pause');
    expect(vm.paused).toBe(true);
    const view = m.get('w');
    expect(view.idlePaused).toBe(true);
    expect(view.stateReason).toBe('idle for 1s; wakes on exec, logs --follow, files or a connection');
    const woken = await Promise.all([m.instance('w').wake('test'), m.instance('w').wake('test'), m.instance('w').wake('test')]);
    expect(woken.map((r) => r.state)).toEqual(['running', 'running', 'running']);
    expect(resumes()).toBe(1);
    expect(vm.paused).toBe(false);
    expect(m.get('w').idlePaused).toBeUndefined();
    expect(m.get('w').stateReason).toBeUndefined();
    await sleep(600);
    expect(m.get('w').state).toBe('running'); // a fresh idle time from the wake
    await until(() => m.get('w').state === 'paused', 'the second idle pause');
  });

  it('an exec wakes it and keeps it awake while it runs, however quiet', async () => {
    await m.create({ handle: 'e', command: ['sleep', '60'], idlePauseMs: 1000 });
    const vm = backend.vms[0];
    if (!vm) throw new Error('no VM');
    await until(() => m.get('e').state === 'paused', 'the idle pause');
    const events: ExecEvent[] = [];
    const exec = m.instance('e').exec({ command: ['sleep', '5'] }, (ev) => void events.push(ev));
    await until(() => events.some((e) => e.type === 'started'), 'the exec to start');
    expect(m.get('e').state).toBe('running');
    expect(vm.execs).toEqual([['sleep', '5']]);
    await sleep(1500);
    expect(m.get('e').state).toBe('running'); // an exec is in progress
    const started = events.find((e) => e.type === 'started');
    const execId = started?.type === 'started' ? started.execId : '';
    vm.guest?.peer.notify('execExit', { execId, exitCode: 0, signal: null });
    await exec;
    await sleep(600);
    expect(m.get('e').state).toBe('running'); // the idle time starts when the exec ends
    await until(() => m.get('e').state === 'paused', 'the pause after the exec');
  });

  it("a user's pause is not woken: exec fails FAILED_PRECONDITION, wake leaves it; pause turns an idle pause into the user's", async () => {
    await m.create({ handle: 'u', command: ['sleep', '60'], idlePauseMs: 1000 });
    await m.instance('u').pause();
    expect(m.get('u').idlePaused).toBeUndefined();
    expect(await codeOf(m.instance('u').exec({ command: ['true'] }, () => undefined))).toBe('FAILED_PRECONDITION');
    expect((await m.instance('u').wake('test')).state).toBe('paused');
    await m.instance('u').resume();
    await until(() => m.get('u').state === 'paused', 'the idle pause');
    expect(m.get('u').idlePaused).toBe(true);
    await m.instance('u').pause();
    expect(m.get('u').state).toBe('paused');
    expect(m.get('u').idlePaused).toBeUndefined();
    expect(await codeOf(m.instance('u').exec({ command: ['true'] }, () => undefined))).toBe('FAILED_PRECONDITION');
    // A resume of an idle-paused one clears the reason too.
    await m.instance('u').resume();
    await until(() => m.get('u').idlePaused === true, 'the idle pause again');
    await m.instance('u').resume();
    expect(m.get('u').stateReason).toBeUndefined();
  });

  it('no idle pause unless asked, and idlePauseMs under 1 s is INVALID_ARGUMENT before anything exists', async () => {
    await m.create({ handle: 'n', command: ['sleep', '60'] });
    expect(m.get('n').idlePauseMs).toBeUndefined();
    expect(await codeOf(m.create({ handle: 'short', command: ['sleep', '60'], idlePauseMs: 999 }))).toBe('INVALID_ARGUMENT');
    expect(m.list(true).map((i) => i.handle)).toEqual(['n']);
    await sleep(1200);
    expect(m.get('n').state).toBe('running');
  });
});
