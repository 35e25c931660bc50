/**
 * A backend the daemon was never edited for: the libkrun-shaped test backend
 * (tests/support/launcher-vmm.ts), bundled to a module and named in AEGIS_BACKEND_MODULES,
 * runs a workload under a real aegisd and is found again after the daemon is killed. Nothing
 * here boots a guest kernel: its "VM" is a launcher process serving a scripted harness.
 */
import { execFile } from 'node:child_process';
import path from 'node:path';
import { build } from 'esbuild';
import { beforeAll, describe, expect, it } from 'vitest';
import { ROOT, TestDaemon, ownDaemon, until } from './fixture.js';

const BUNDLE = path.join(ROOT, 'tests/support/launcher-vmm.bundle.mjs');

beforeAll(async () => {
  // Beside its source, so that its launcher script is found, and @aegis/* resolve from the repository.
  await build({
    entryPoints: [path.join(ROOT, 'tests/support/launcher-vmm.ts')],
    outfile: BUNDLE,
    bundle: true,
    format: 'esm',
    platform: 'node',
    external: ['@aegis/*'],
    logLevel: 'error',
  });
});

/** This home's launcher processes. */
function launchers(home: string): Promise<string[]> {
  return new Promise((resolve) =>
    execFile('ps', ['-eo', 'pid=,args='], (_e, stdout) =>
      resolve(stdout.split('\n').filter((l) => l.includes('launcher-vm.mjs') && l.includes(home))),
    ),
  );
}

const env = { AEGIS_BACKEND_MODULES: BUNDLE, AEGIS_BACKEND: 'launcher-test', AEGIS_WARM_BOOT: '0' };

describe('a backend registered by module (AEGIS_BACKEND_MODULES), with no daemon edits', () => {
  it('is the backend aegisd picks when AEGIS_BACKEND names it, and runs a workload to its end', async () => {
    const d = await ownDaemon(env);
    expect((await d.client.status()).backend.name).toBe('launcher-test');
    const r = await d.cli(['run', '--network', 'none', '--', 'echo', 'hello', 'from', 'a', 'launcher']);
    expect(r).toMatchObject({ code: 0, stdout: 'hello from a launcher\n' });
    await until(async () => (await launchers(d.home)).length === 0, 10_000, 'the launcher to end');
  });

  it('keeps its VM across an aegisd crash: the new daemon takes it over and stops it', async () => {
    const d = await ownDaemon(env);
    const r = await d.cli(['run', '-d', '--network', 'none', '--name', 'long', '--', 'sleep', '600']);
    expect(r.code).toBe(0);
    const before = await launchers(d.home);
    expect(before).toHaveLength(1);
    await d.kill();
    await d.start();
    expect(await launchers(d.home)).toEqual(before);
    expect((await d.client.getInstance('long')).state).toBe('running');
    expect((await d.cli(['rm', '-f', 'long'])).code).toBe(0);
    await until(async () => (await launchers(d.home)).length === 0, 10_000, 'the launcher to end');
  });

  it('a VM started with it is ended when aegisd comes back with another backend, and its instance settled', async () => {
    const d = await ownDaemon(env);
    expect((await d.cli(['run', '-d', '--network', 'none', '--name', 'orphan', '--', 'sleep', '600'])).code).toBe(0);
    expect(await launchers(d.home)).toHaveLength(1);
    await d.kill();
    // The same home, the module still registered, but QEMU chosen: nothing can own that VM now.
    const other = new TestDaemon(d.home, { AEGIS_BACKEND_MODULES: BUNDLE, AEGIS_WARM_BOOT: '0' });
    try {
      await other.start();
      expect((await other.client.status()).backend.name).toBe('qemu');
      await until(async () => (await launchers(d.home)).length === 0, 10_000, 'the launcher to be ended');
      expect((await other.client.getInstance('orphan')).state).toBe('failed');
    } finally {
      await other.stop();
    }
  });
});
