/**
 * The instance owner with a fake backend (no VM): operations on one instance never interleave,
 * a start in flight is cancelled by the stop or delete behind it, and nothing it would have
 * booted runs afterwards. The same lifecycle runs against real VMs in tests/integration.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, onTestFinished } from 'vitest';
import { fakeDaemon, type FakeDaemon } from '../../../../tests/support/fake-daemon.js';
import type { FakeBackend } from '../../../../tests/support/fake-vmm.js';
import { codeOf } from '../../../../tests/support/rejection.js';
import type { InstanceManager } from './manager.js';

let home = '';
let backend: FakeBackend;
let m: InstanceManager;
let fake: FakeDaemon;

beforeEach(async () => {
  fake = await fakeDaemon('aegis-owner-');
  ({ home, backend, m } = fake);
});

afterEach(() => fake.close());

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200 && !cond(); i++) await new Promise((r) => setTimeout(r, 10));
  if (!cond()) throw new Error(`timed out waiting for ${what}`);
}

/** Starts a create whose boot is held open; resolves once the VM is booting. */
async function startHeld(handle: string): Promise<{ create: Promise<unknown>; id: string }> {
  backend.holdBoots();
  const create = m.create({ handle, command: ['sleep', '60'] });
  create.catch(() => undefined);
  await until(() => backend.events.some((e) => e.startsWith('start ')), 'the boot');
  return { create, id: m.get(handle).id };
}

describe('one owner per instance', () => {
  it('stop while starting cancels the start: nothing boots afterwards and no VM is left', async () => {
    const { create } = await startHeld('s');
    const stopped = await m.instance('s').stop();
    expect(await codeOf(create)).toBe('CANCELLED');
    expect(stopped.state).toBe('stopped');
    expect(stopped.stateReason).toMatch(/stopped while starting/);
    backend.releaseBoots();
    await new Promise((r) => setTimeout(r, 50));
    expect(backend.events.filter((e) => e.startsWith('run '))).toEqual([]);
    expect(backend.runningVms()).toEqual([]);
  });

  it('delete --force during a start returns after the start is undone, and the workload never starts', async () => {
    const { create } = await startHeld('d');
    await m.instance('d').delete(true);
    expect(await codeOf(create)).toBe('CANCELLED');
    expect(m.list(true)).toEqual([]);
    backend.releaseBoots();
    await new Promise((r) => setTimeout(r, 50));
    expect(backend.events.filter((e) => e.startsWith('run '))).toEqual([]);
    expect(backend.runningVms()).toEqual([]);
  });

  it('a plain delete during a start is refused with FAILED_PRECONDITION and the start goes on', async () => {
    const { create } = await startHeld('p');
    expect(await codeOf(m.instance('p').delete(false))).toBe('FAILED_PRECONDITION');
    backend.releaseBoots();
    expect(await codeOf(create)).toBe('ok');
    expect(m.get('p').state).toBe('running');
    expect(backend.runningVms()).toHaveLength(1);
  });

  it('serialises concurrent operations: every one either succeeds or is refused with a code, and the end state is consistent', async () => {
    await m.create({ handle: 'c', command: ['sleep', '60'] });
    const ops = [
      m.instance('c').pause(),
      m.instance('c').resume(),
      m.instance('c').pause(),
      m.instance('c').stop(),
      m.instance('c').resume(),
      m.instance('c').pause(),
    ];
    const codes = await Promise.all(ops.map(codeOf));
    expect(codes).toEqual(['ok', 'ok', 'ok', 'ok', 'FAILED_PRECONDITION', 'FAILED_PRECONDITION']);
    expect(m.get('c').state).toBe('stopped');
    expect(backend.runningVms()).toEqual([]);
  });

  it('operations queued behind a delete find the instance gone (NOT_FOUND), never a half-deleted one', async () => {
    await m.create({ handle: 'g', command: ['sleep', '60'] });
    const del = m.instance('g').delete(true);
    const after = m.instance('g').pause();
    expect(await codeOf(del)).toBe('ok');
    expect(await codeOf(after)).toBe('NOT_FOUND');
  });

  it('exec fails with UNAVAILABLE instead of hanging when the agent channel drops while the VM lives', async () => {
    await m.create({ handle: 'e', command: ['sleep', '60'] });
    const events: string[] = [];
    const exec = m.instance('e').exec({ command: ['sleep', '60'] }, (ev) => void events.push(ev.type));
    exec.catch(() => undefined);
    await until(() => events.includes('started'), 'the exec to start');
    backend.vms[0]?.dropAgent();
    const started = Date.now();
    expect(await codeOf(exec)).toBe('UNAVAILABLE');
    expect(Date.now() - started).toBeLessThan(1000);
    // The channel is opened again: the instance keeps working.
    await until(() => backend.vms[0]?.guest !== undefined, 'the agent to reconnect');
    void m
      .instance('e')
      .exec({ command: ['true'] }, () => undefined)
      .catch(() => undefined);
    await until(() => backend.vms[0]?.execs.length === 2, 'a second exec to reach the guest');
    await m.instance('e').delete(true); // ends the second exec (its guest never answers)
  });

  it('an aborted API call surfaces as CANCELLED, not INTERNAL', async () => {
    backend.holdBoots();
    const caller = new AbortController();
    const create = m.create({ handle: 'a', command: ['true'] }, caller.signal);
    await until(() => backend.events.some((e) => e.startsWith('start ')), 'the boot');
    caller.abort();
    expect(await codeOf(create)).toBe('CANCELLED');
    expect(backend.runningVms()).toEqual([]);
  });
});

describe('volumes', () => {
  it('hands the backend its volumes (parents first, host paths resolved) and boots them cold', async () => {
    // Outside AEGIS_HOME, which may not be shared.
    const outside = mkdtempSync(path.join(os.tmpdir(), 'aegis-owner-share-'));
    const shared = path.join(outside, 'shared');
    mkdirSync(shared);
    onTestFinished(() => rmSync(outside, { recursive: true, force: true }));
    await m.create({
      handle: 'v',
      command: ['sleep', '60'],
      volumes: [
        { type: 'volume', source: 'cache', target: '/work/cache/' },
        { type: 'bind', source: path.join(outside, '.', 'shared'), target: '/work', readOnly: true },
      ],
    });
    const config = backend.configs.at(-1);
    expect(config?.restoreFrom).toBeUndefined();
    expect(config?.volumes).toEqual([
      { kind: 'share', hostPath: shared, guestPath: '/work', readOnly: true },
      { kind: 'disk', hostPath: m.volumes.fileOf('cache'), guestPath: '/work/cache', readOnly: false },
    ]);
    expect(m.get('v').volumes.map((v) => v.target)).toEqual(['/work/cache', '/work']);
  });

  it('lets one of two concurrent starts have a volume read-write, and refuses the other', async () => {
    const start = (handle: string): Promise<unknown> =>
      m.create({ handle, command: ['sleep', '60'], volumes: [{ type: 'volume', source: 'one', target: '/v' }] });
    const codes = await Promise.all([codeOf(start('a')), codeOf(start('b')), codeOf(start('c'))]);
    expect([...codes].sort()).toEqual(['FAILED_PRECONDITION', 'FAILED_PRECONDITION', 'ok']);
    await m.instance(['a', 'b', 'c'][codes.indexOf('ok')] ?? '').stop();
    expect(await codeOf(start('d'))).toBe('ok');
  });

  it('refuses a missing host directory (NOT_FOUND) and a kind the backend lacks (UNSUPPORTED) before anything exists', async () => {
    expect(await codeOf(m.create({ command: ['true'], volumes: [{ type: 'bind', source: path.join(home, 'nope'), target: '/x' }] }))).toBe(
      'NOT_FOUND',
    );
    const diskOnly = await fakeDaemon('aegis-owner-disk-', { volumeKinds: ['disk'] });
    onTestFinished(() => diskOnly.close());
    expect(await codeOf(diskOnly.m.create({ command: ['true'], volumes: [{ type: 'bind', source: diskOnly.home, target: '/x' }] }))).toBe(
      'UNSUPPORTED',
    );
    expect(m.list(true)).toEqual([]);
  });
});
