/**
 * Stray VMs after a daemon restart, through the VMM interface only: a process the backend
 * started that no live instance owns (a VM whose record was never written) is ended, and a
 * live instance's own VM is left running. (Taking over and settling instances is each owner's:
 * instance.test.ts.) Real processes: the launcher test backend's
 * (tests/support/launcher-vmm.ts), one per VM; no daemon code names it.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { Vm, VmConfig } from '@aegis/vmm';
import { LauncherBackend } from '../../../../tests/support/launcher-vmm.js';
import { instanceRow } from '../../../../tests/support/rows.js';
import { Registry, type InstanceRow } from '../registry/db.js';
import { endStrays } from './recovery.js';

let home: string;
let registry: Registry;
const backend = new LauncherBackend();
const vms: Vm[] = [];

beforeEach(() => {
  home = mkdtempSync(path.join(os.tmpdir(), 'aegis-recovery-'));
  registry = new Registry(path.join(home, 'aegis.db'));
});
afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.stop({ timeoutMs: 0 }).catch(() => undefined);
  registry.close();
  rmSync(home, { recursive: true, force: true });
});

const instancesDir = (): string => path.join(home, 'instances');

async function started(id: string): Promise<Vm> {
  const stateDir = path.join(instancesDir(), id, 'vm');
  mkdirSync(stateDir, { recursive: true });
  const config: VmConfig = {
    id,
    stateDir,
    kernelPath: '/nonexistent',
    rootfsPath: '/nonexistent',
    scratchDiskPath: '/nonexistent',
    memoryMiB: 128,
    vcpuCount: 1,
    network: 'none',
    kernelArgs: [],
  };
  const vm = await backend.create(config);
  vms.push(vm);
  await vm.start();
  return vm;
}

function row(id: string, over: Partial<InstanceRow>): InstanceRow {
  const now = Date.now();
  return instanceRow({
    id,
    handle: `h-${id.slice(0, 4)}`,
    state: 'running',
    command: ['true'],
    memoryMiB: 128,
    backend: backend.name,
    createdAt: now,
    startedAt: now,
    ...over,
  });
}

describe('endStrays', () => {
  it("ends a VM no live instance owns and leaves a live instance's VM running", async () => {
    const owned = await started('aaaaaaaaaaaaaaaa');
    const stray = await started('bbbbbbbbbbbbbbbb');
    registry.insertInstance(row('aaaaaaaaaaaaaaaa', { vmRecord: owned.record() }));
    // The daemon "restarts": it lets go of both.
    owned.detach();
    stray.detach();
    const warned: string[] = [];
    const ended = await endStrays({
      registry,
      backend,
      log: { info: () => undefined, warn: (s) => void warned.push(s) },
      instancesDir: instancesDir(),
    });
    expect(ended).toBe(1);
    expect(warned).toEqual([expect.stringContaining(`ended a launcher process (pid ${stray.hostPid()}) of instance bbbbbbbbbbbbbbbb`)]);
    const gone = (pid: number | undefined): boolean => {
      try {
        process.kill(pid ?? 0, 0);
        return false;
      } catch {
        return true;
      }
    };
    for (let i = 0; i < 100 && !gone(stray.hostPid()); i++) await new Promise((r) => setTimeout(r, 20));
    expect(gone(stray.hostPid())).toBe(true);
    expect(gone(owned.hostPid())).toBe(false);
    // Taken over again by a later attach, as a new daemon's owner does.
    vms.push(await backend.attach(owned.record()));
  });
});
