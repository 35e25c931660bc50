/**
 * A hibernated instance's files (`<instance>/hibernation/`): the machine record a restore
 * needs and the VMM's saved memory and devices. Its disk is its own and stays where it is.
 * What hibernating means for the instance (its state, its ports, its VMM's end) is decided in
 * instance.ts; this file only writes, reads and removes the files.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { Vm } from '@aegis/vmm';
import { readMachine, writeMachine, type MachineRecord } from './machine.js';

export function hibernationDir(instanceDir: string): string {
  return path.join(instanceDir, 'hibernation');
}

/**
 * Saves the running VM (the VMM stays, paused, until the caller ends it). On failure the VM
 * runs on and nothing is left behind.
 */
export async function saveHibernation(instanceDir: string, vm: Vm, signal: AbortSignal): Promise<{ ms: number; bytes: number }> {
  if (!vm.saveSnapshot) throw new Error('the VM cannot be saved');
  const dir = hibernationDir(instanceDir);
  await fs.rm(dir, { recursive: true, force: true });
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  await writeMachine(dir, await readMachine(path.join(instanceDir, 'vm')));
  const t0 = Date.now();
  try {
    await vm.saveSnapshot(path.join(dir, 'state'), signal);
  } catch (err) {
    await vm.resume().catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
    throw err;
  }
  const st = await fs.stat(path.join(dir, 'state'));
  return { ms: Date.now() - t0, bytes: st.size };
}

/** The saved machine, or undefined when its files are gone or unreadable. */
export async function readHibernation(instanceDir: string): Promise<{ machine: MachineRecord; state: string } | undefined> {
  const dir = hibernationDir(instanceDir);
  const state = path.join(dir, 'state');
  try {
    const machine = await readMachine(dir);
    await fs.access(state);
    return { machine, state };
  } catch {
    return undefined;
  }
}

export async function removeHibernation(instanceDir: string): Promise<void> {
  await fs.rm(hibernationDir(instanceDir), { recursive: true, force: true });
}
