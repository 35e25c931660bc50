/**
 * Template garbage collection on a directory laid out by hand (no VM): what stays and what
 * goes. Building and restoring templates runs on real VMs in tests/integration/warm.test.ts.
 */
import { existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FakeBackend } from '../../../../tests/support/fake-vmm.js';
import { TemplateCache } from './templates.js';

let dir = '';
let cache: TemplateCache;
const KEY = 'a'.repeat(20);
const build = (n: number): string => `${KEY}.b${String(n).padStart(16, '0')}`;

function makeBuild(name: string): void {
  mkdirSync(path.join(dir, name));
  for (const f of ['scratch.img', 'memory', 'snapshot.bin', 'ready']) writeFileSync(path.join(dir, name, f), '');
}

function ref(name: string, disk: string, ageMs = 0): void {
  const refs = path.join(dir, 'refs', name);
  mkdirSync(refs, { recursive: true });
  const file = path.join(refs, Buffer.from(disk).toString('hex').slice(0, 24));
  writeFileSync(file, disk);
  if (ageMs > 0) {
    const t = (Date.now() - ageMs) / 1000;
    utimesSync(file, t, t);
  }
}

beforeEach(async () => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-templates-unit-'));
  const backend = new FakeBackend();
  const probe = await backend.probe();
  cache = new TemplateCache(backend, () => probe, dir, { info: () => undefined, warn: () => undefined }, 1000, true);
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('template garbage collection', () => {
  it('keeps the current build, builds an instance disk still uses, the lock of a live builder; removes the rest', async () => {
    makeBuild(build(1)); // current
    makeBuild(build(2)); // old, a stopped instance's disk is its child
    makeBuild(build(3)); // old, its only instance was deleted
    symlinkSync(build(1), path.join(dir, `${KEY}.current`));
    const disk = path.join(dir, 'instance-disk.clone');
    writeFileSync(disk, '');
    ref(build(2), disk, 120_000);
    ref(build(3), path.join(dir, 'deleted-instance.clone'), 120_000);
    mkdirSync(path.join(dir, `${KEY}.lock`));
    writeFileSync(path.join(dir, `${KEY}.lock`, 'owner'), String(process.pid));
    mkdirSync(path.join(dir, `${'b'.repeat(20)}.lock`));
    writeFileSync(path.join(dir, `${'b'.repeat(20)}.lock`, 'owner'), '999999999'); // a dead builder
    mkdirSync(path.join(dir, `${KEY}.build-999999999-abcdef`)); // left by a dead daemon

    await cache.collect();

    expect(existsSync(path.join(dir, build(1), 'ready'))).toBe(true);
    expect(existsSync(path.join(dir, `${KEY}.current`))).toBe(true);
    expect(existsSync(path.join(dir, build(2), 'scratch.img'))).toBe(true);
    expect(existsSync(path.join(dir, build(3)))).toBe(false);
    expect(existsSync(path.join(dir, `${KEY}.lock`))).toBe(true);
    expect(existsSync(path.join(dir, `${'b'.repeat(20)}.lock`))).toBe(false);
    expect(existsSync(path.join(dir, `${KEY}.build-999999999-abcdef`))).toBe(false);
  });

  it('keeps a build whose reference is brand new even before its disk exists (the disk is being made)', async () => {
    makeBuild(build(4));
    ref(build(4), path.join(dir, 'not-yet.clone'));
    await cache.collect();
    expect(existsSync(path.join(dir, build(4)))).toBe(true);
  });

  it('removes a build once the last disk that referenced it is gone', async () => {
    makeBuild(build(5));
    const disk = path.join(dir, 'd.clone');
    writeFileSync(disk, '');
    ref(build(5), disk, 120_000);
    await cache.collect();
    expect(existsSync(path.join(dir, build(5)))).toBe(true);
    rmSync(disk);
    await cache.collect();
    expect(existsSync(path.join(dir, build(5)))).toBe(false);
  });
});
