/**
 * What a VM was started as, kept beside it (`vm/machine.json`, written at every start): a
 * checkpoint of the running machine is restored into a VM described the same way (the same
 * devices, RAM layout, root filesystem and VMM), which nothing else records once the VMM runs.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { NetworkMode as VmNetwork, VmVolume } from '@aegis/vmm';

export interface MachineRecord {
  kernelPath: string;
  /** The root filesystem's own file (content-named): a restore needs exactly that one. */
  rootfsPath: string;
  memoryMiB: number;
  vcpuCount: number;
  scratchDiskMiB: number;
  network: VmNetwork;
  kernelArgs: string[];
  imageDiskPath?: string;
  volumes: VmVolume[];
  /** Its RAM was a file-backed memory object (a template's clone), which names RAM differently. */
  ramInFile: boolean;
  /** The VMM that ran it: a snapshot restores only under the same one and the same accelerator. */
  backend: string;
  vmmVersion: string;
  acceleration: string;
  /** The CPU the guest saw (`Capabilities.cpu`); absent in records of aegis before it was kept. */
  cpu?: string;
}

const FILE = 'machine.json';

export async function writeMachine(vmDir: string, m: MachineRecord): Promise<void> {
  await fs.writeFile(path.join(vmDir, FILE), JSON.stringify(m), { mode: 0o600 });
}

export async function readMachine(vmDir: string): Promise<MachineRecord> {
  try {
    return JSON.parse(await fs.readFile(path.join(vmDir, FILE), 'utf8')) as MachineRecord;
  } catch {
    throw new AegisError(
      'FAILED_PRECONDITION',
      'this VM was started by an older aegisd, which kept no record of its machine: restart it first',
    );
  }
}

/** Why `saved` cannot be restored by this daemon, or undefined when it can. */
export function restoreMismatch(
  saved: MachineRecord,
  now: Pick<MachineRecord, 'backend' | 'vmmVersion' | 'acceleration'> & { cpu: string },
): string | undefined {
  if (saved.backend !== now.backend) return `it was saved by the ${saved.backend} backend, this daemon runs ${now.backend}`;
  if (saved.acceleration !== now.acceleration) return `it was saved under ${saved.acceleration}, this daemon runs ${now.acceleration}`;
  if (saved.vmmVersion !== now.vmmVersion) return `it was saved by ${saved.vmmVersion}, this host has ${now.vmmVersion}`;
  // A guest goes on using the CPU features it found at boot: restored onto fewer, it faults.
  if (saved.cpu !== now.cpu) return `it was saved on a CPU the guest saw as ${saved.cpu ?? 'unrecorded'}, this host gives ${now.cpu}`;
  return undefined;
}
