/**
 * One instance's owner with a fake backend (no VM): every transition of its state table, what
 * the VM reports arriving as queued events, restart on the kept disk, deadlines, throwaway
 * removal whichever way the instance goes down, and a new daemon taking over. The same
 * lifecycle runs against real VMs in tests/integration.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { fakeDaemon, type FakeDaemon } from '../../../../tests/support/fake-daemon.js';
import type { FakeBackend, FakeVm } from '../../../../tests/support/fake-vmm.js';
import { codeOf } from '../../../../tests/support/rejection.js';
import type { InstanceManager } from './manager.js';

let backend: FakeBackend;
let m: InstanceManager;
let fake: FakeDaemon;

beforeEach(async () => {
  fake = await fakeDaemon('aegis-instance-');
  ({ backend, m } = fake);
});

afterEach(async () => {
  for (const i of fake.m.list(true))
    await fake.m
      .instance(i.id)
      .delete(true)
      .catch(() => undefined);
  fake.m.detachAll();
  fake.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, what: string, ms = 3000): Promise<void> {
  for (let i = 0; i < ms / 10 && !cond(); i++) await sleep(10);
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

function vmOf(handle: string): FakeVm {
  const id = fake.m.get(handle).id;
  const vm = [...backend.vms].reverse().find((v) => v.id === id);
  if (!vm) throw new Error(`no VM for ${handle}`);
  return vm;
}

const handles = (): string[] => fake.m.list(true).map((i) => i.handle);

describe('transitions', () => {
  it('starting -> running; the workload exits: stopped with its status once the VM is down', async () => {
    const view = await m.create({ handle: 'x', command: ['true'] });
    expect(view.state).toBe('running');
    expect(view.startedAt).toBeDefined();
    vmOf('x').guest?.peer.notify('exit', { exitCode: 3, signal: null });
    expect(await m.instance('x').wait()).toEqual({ state: 'stopped', exitCode: 3, stateReason: 'workload exited with status 3' });
    expect(backend.runningVms()).toEqual([]);
  });

  it('a workload killed by a signal reports 128 + N', async () => {
    await m.create({ handle: 'k', command: ['sleep', '60'] });
    vmOf('k').guest?.peer.notify('exit', { exitCode: null, signal: 'SIGKILL' });
    expect((await m.instance('k').wait()).exitCode).toBe(137);
  });

  it('a VM that dies under a running or a paused instance fails it, saying so', async () => {
    await m.create({ handle: 'r', command: ['sleep', '60'] });
    await m.create({ handle: 'p', command: ['sleep', '60'] });
    await m.instance('p').pause();
    vmOf('r').end({ reason: 'vmm-error', detail: 'VMM crashed' });
    vmOf('p').end({ reason: 'killed', detail: 'killed by hand' });
    const r = await m.instance('r').wait();
    const p = await m.instance('p').wait();
    expect(r).toMatchObject({ state: 'failed', stateReason: 'VM ended unexpectedly: VMM crashed' });
    expect(p).toMatchObject({ state: 'failed', stateReason: 'VM ended unexpectedly: killed by hand' });
  });

  it('pause, resume and stop follow the table; a refused one names the state and the way out', async () => {
    await m.create({ handle: 's', command: ['sleep', '60'] });
    const s = m.instance('s');
    expect((await s.pause()).state).toBe('paused');
    await expect(s.pause()).rejects.toThrow(/it is paused; resume it first: aegis instance resume s/);
    expect(await codeOf(s.exec({ command: ['true'] }, () => undefined))).toBe('FAILED_PRECONDITION');
    expect((await s.resume()).state).toBe('running');
    await expect(s.resume()).rejects.toThrow(/it is running/);
    const stopped = await s.stop();
    expect(stopped).toMatchObject({ state: 'stopped', stateReason: 'stopped by request' });
    expect((await s.stop()).state).toBe('stopped'); // as docker stop: nothing to do
    expect(await codeOf(s.pause())).toBe('FAILED_PRECONDITION');
    expect(await codeOf(s.signal('SIGTERM'))).toBe('FAILED_PRECONDITION');
  });

  it('a workload that exits before its start is answered: the exit is queued behind the start, and it ends stopped', async () => {
    backend.exitOnRun = 0;
    await m.create({ handle: 'q', command: ['true'] });
    expect(await m.instance('q').wait()).toMatchObject({ state: 'stopped', exitCode: 0 });
    expect(backend.runningVms()).toEqual([]);
  });

  it('a stop queued behind a running exec admission waits for it, and the exec then fails with the VM', async () => {
    await m.create({ handle: 'e', command: ['sleep', '60'] });
    const exec = m.instance('e').exec({ command: ['sleep', '60'] }, () => undefined);
    const stop = m.instance('e').stop(100);
    expect((await stop).state).toBe('stopped');
    expect(await codeOf(exec)).toBe('UNAVAILABLE');
    expect(vmOf('e').execs).toEqual([['sleep', '60']]);
  });
});

describe('restart', () => {
  it('boots a new VM cold on the kept disk with the same command and environment; the exit status is reset', async () => {
    await m.create({ handle: 'r', command: ['sleep', '60'], env: { A: '1' } });
    vmOf('r').guest?.peer.notify('exit', { exitCode: 1, signal: null });
    await m.instance('r').wait();
    const view = await m.instance('r').restart();
    expect(view).toMatchObject({ state: 'running', exitCode: null });
    expect(backend.vms).toHaveLength(2);
    const [first, second] = backend.configs;
    expect(second?.scratchDiskPath).toBe(first?.scratchDiskPath);
    expect(second?.restoreFrom).toBeUndefined();
    expect(backend.vms[1]?.runs).toEqual([['sleep', '60']]);
  });

  it('restarts a running instance: stopped first, then booted again', async () => {
    await m.create({ handle: 'r2', command: ['sleep', '60'] });
    const before = vmOf('r2');
    expect((await m.instance('r2').restart()).state).toBe('running');
    expect(before.gone).toBe(true);
    expect(backend.runningVms()).toHaveLength(1);
  });
});

describe('deadlines', () => {
  it('stops the instance at its deadline with the reason; extend moves it, 0 removes it', async () => {
    await m.create({ handle: 'd', command: ['sleep', '60'], timeoutMs: 300 });
    await until(() => m.get('d').state === 'stopped', 'the deadline', 3000);
    expect(m.get('d').stateReason).toMatch(/^deadline reached/);

    await m.create({ handle: 'x', command: ['sleep', '60'], timeoutMs: 300 });
    expect(m.instance('x').extend(0).deadline).toBeUndefined();
    await sleep(500);
    expect(m.get('x').state).toBe('running');
  });

  it('an exec in flight at the deadline ends with TIMEOUT saying the deadline was reached', async () => {
    await m.create({ handle: 'de', command: ['sleep', '60'], timeoutMs: 400 });
    const exec = m.instance('de').exec({ command: ['sleep', '60'] }, () => undefined);
    await expect(exec).rejects.toMatchObject({
      code: 'TIMEOUT',
      message: 'instance "de" reached its deadline (--timeout 400 ms) and is being stopped',
    });
    await until(() => m.get('de').state === 'stopped', 'the stop');
  });

  it('a throwaway instance is removed at its deadline', async () => {
    await m.create({ handle: 't', command: ['sleep', '60'], timeoutMs: 300, autoRemove: true });
    const removed = m.instance('t').removed;
    await removed;
    expect(handles()).toEqual([]);
    expect(backend.runningVms()).toEqual([]);
  });
});

describe('throwaway instances are removed once down, whichever way', () => {
  it('its workload exited', async () => {
    await m.create({ handle: 'w', command: ['true'], autoRemove: true });
    const removed = m.instance('w').removed;
    vmOf('w').guest?.peer.notify('exit', { exitCode: 0, signal: null });
    await removed;
    expect(handles()).toEqual([]);
  });

  it('its start failed (and the error is the start failure)', async () => {
    backend.create = () => Promise.reject(new AegisError('UNAVAILABLE', 'no VMM here'));
    await expect(m.create({ handle: 'f', command: ['true'], autoRemove: true })).rejects.toThrow('no VMM here');
    expect(handles()).toEqual([]);
    // A kept one stays, failed, with why.
    expect(await codeOf(m.create({ handle: 'g', command: ['true'] }))).toBe('UNAVAILABLE');
    expect(m.get('g')).toMatchObject({ state: 'failed', stateReason: 'start failed: no VMM here' });
  });

  it('its creator went away during the start', async () => {
    backend.holdBoots();
    const caller = new AbortController();
    const create = m.create({ handle: 'a', command: ['true'], autoRemove: true }, caller.signal);
    await until(() => backend.events.some((e) => e.startsWith('start ')), 'the boot');
    caller.abort();
    expect(await codeOf(create)).toBe('CANCELLED');
    await until(() => handles().length === 0, 'the removal');
    backend.releaseBoots();
    expect(backend.runningVms()).toEqual([]);
  });

  it('its creator went away after the start (abandon)', async () => {
    await m.create({ handle: 'b', command: ['sleep', '60'], autoRemove: true });
    const removed = m.instance('b').removed;
    m.instance('b').abandon();
    await removed;
    expect(handles()).toEqual([]);
    // A kept instance is left alone.
    await m.create({ handle: 'c', command: ['sleep', '60'] });
    m.instance('c').abandon();
    await sleep(50);
    expect(m.get('c').state).toBe('running');
  });
});

describe('a new daemon', () => {
  it('takes over running and paused VMs, fails a start caught half-way, settles a VM that went, removes a throwaway that stopped', async () => {
    await m.create({ handle: 'keep', command: ['sleep', '60'] });
    await m.create({ handle: 'paused', command: ['sleep', '60'] });
    await m.instance('paused').pause();
    await m.create({ handle: 'half', command: ['sleep', '60'] });
    await m.create({ handle: 'gone', command: ['sleep', '60'] });
    await m.create({ handle: 'tw', command: ['sleep', '60'], autoRemove: true });
    const half = vmOf('half');
    // As if the daemon died while `half` was starting.
    expect(fake.registry.transitionInstance(m.get('half').id, 'running', { state: 'starting' })).toBe(true);
    const next = await fake.restart(() => {
      vmOf('gone').end({ reason: 'killed', detail: 'gone' });
      vmOf('tw').end({ reason: 'killed', detail: 'gone' });
    });
    expect(next.get('keep').state).toBe('running');
    expect(backend.events).toContain(`attach ${next.get('keep').id}`);
    expect(next.get('paused').state).toBe('paused');
    expect(next.get('half')).toMatchObject({ state: 'failed', stateReason: 'aegisd stopped while the instance was starting' });
    expect(half.gone).toBe(true);
    expect(next.get('gone')).toMatchObject({ state: 'failed' });
    expect(next.get('gone').stateReason).toMatch(/^VM ended while aegisd was not running/);
    expect(handles()).not.toContain('tw');

    // The adopted ones work as before: an exec reaches the guest once its channel is back; resume runs.
    await until(() => vmOf('keep').guest !== undefined, 'the agent channel');
    const events: string[] = [];
    const exec = next.instance('keep').exec({ command: ['echo', 'hi'] }, (ev) => void events.push(ev.type));
    exec.catch(() => undefined);
    await until(() => events.includes('started'), 'the exec');
    expect(vmOf('keep').execs).toEqual([['echo', 'hi']]);
    expect((await next.instance('paused').resume()).state).toBe('running');
    expect((await next.instance('keep').stop(100)).state).toBe('stopped');
  });

  it('re-arms deadlines that outlived the daemon: one that passed meanwhile fires at once', async () => {
    await m.create({ handle: 'late', command: ['sleep', '60'], timeoutMs: 200 });
    const next = await fake.restart(() => sleep(300));
    await until(() => next.get('late').state === 'stopped', 'the deadline');
    expect(next.get('late').stateReason).toMatch(/^deadline reached/);
  });
});

describe('warm paths: template, pool, and the cold boot they fall back to', () => {
  async function warmDaemon(poolSize = 0): Promise<void> {
    fake.close();
    fake = await fakeDaemon('aegis-instance-warm-', { warm: true, poolSize });
    ({ backend, m } = fake);
  }

  afterEach(async () => {
    await fake.m.closePool();
  });

  it('restores from the template on a clone of its disk, then gives the VM its own identity', async () => {
    await warmDaemon();
    await m.warmUp(); // builds the template for the default shape
    expect(backend.events.some((e) => e.startsWith('snapshot template-'))).toBe(true);
    const view = await m.create({ handle: 'w', command: ['sleep', '60'] });
    expect(view.state).toBe('running');
    const config = backend.configs.at(-1);
    expect(config?.restoreFrom).toMatch(/snapshot\.bin$/);
    expect(config?.scratchDiskCloned).toBe(true);
    expect(config?.snapshotMemory?.access).toBe('map');
    expect(backend.events).toContain(`fresh ${view.id}`);
    expect(vmOf('w').runs).toEqual([['sleep', '60']]);
  });

  it('a template that fails to restore is set aside and the instance boots cold', async () => {
    await warmDaemon();
    await m.warmUp();
    backend.failRestores = true;
    const view = await m.create({ handle: 'c', command: ['sleep', '60'] });
    expect(view.state).toBe('running');
    const [warm, cold] = backend.configs.slice(-2);
    expect(warm?.restoreFrom).toBeDefined();
    expect(cold?.restoreFrom).toBeUndefined();
    expect(cold?.scratchDiskCloned).toBeFalsy();
    expect(fake.logged.some((l) => /warm boot failed \(the snapshot does not restore\); booting cold/.test(l))).toBe(true);
    expect(backend.runningVms().map((v) => v.id)).toEqual([view.id]);
  });

  it('takes a ready VM from the pool: it becomes the instance (same id), resumed and made fresh, with no boot', async () => {
    await warmDaemon(1);
    await m.warmUp();
    await until(() => (m.poolStatus()?.ready ?? 0) === 1, 'the pool to fill', 5000);
    const pooled = backend.runningVms()[0];
    expect(pooled?.paused).toBe(true);
    const starts = backend.events.filter((e) => e.startsWith('start ')).length;
    const view = await m.create({ handle: 'p', command: ['sleep', '60'] });
    expect(view.id).toBe(pooled?.id);
    expect(pooled?.paused).toBe(false);
    expect(backend.events).toContain(`fresh ${view.id}`);
    expect(pooled?.runs).toEqual([['sleep', '60']]);
    // No VM started for it (the pool's refill may start one of its own, never this instance's).
    expect(backend.events.filter((e) => e.startsWith(`start ${view.id}`))).toHaveLength(1);
    expect(backend.events.filter((e) => e.startsWith('start ')).length).toBeGreaterThanOrEqual(starts);
    expect(m.poolStatus()?.taken).toBe(1);
  });

  it('a pooled VM that fails is ended and the instance boots cold', async () => {
    await warmDaemon(1);
    await m.warmUp();
    await until(() => (m.poolStatus()?.ready ?? 0) === 1, 'the pool to fill', 5000);
    const pooled = backend.runningVms()[0];
    if (!pooled) throw new Error('no pooled VM');
    pooled.resume = () => Promise.reject(new AegisError('UNAVAILABLE', 'the VMM does not answer'));
    const view = await m.create({ handle: 'f', command: ['sleep', '60'] });
    expect(view.state).toBe('running');
    expect(pooled.gone).toBe(true);
    expect(backend.configs.at(-1)?.restoreFrom).toBeUndefined();
    expect(vmOf('f').runs).toEqual([['sleep', '60']]);
    expect(fake.logged.some((l) => /pooled VM failed \(the VMM does not answer\); booting cold/.test(l))).toBe(true);
  });
});
