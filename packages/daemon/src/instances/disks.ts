import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { promisify } from 'node:util';
import { AegisError } from '@aegis/protocol';

const execFileP = promisify(execFile);

/** A sparse ext4 disk: the instance's writable layer. Costs nothing until the guest writes. */
export async function makeScratchDisk(file: string, sizeMiB: number): Promise<void> {
  const fh = await fs.open(file, 'w', 0o600);
  await fh.truncate(sizeMiB * 1024 * 1024);
  await fh.close();
  try {
    await execFileP('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', '-E', 'root_owner=0:0,lazy_itable_init=1', '-m', '0', file], {
      timeout: 30_000,
    });
  } catch (err) {
    throw new AegisError('UNAVAILABLE', `cannot format the scratch disk (is e2fsprogs installed?): ${(err as Error).message}`);
  }
}

/**
 * An instance's writable disk, by how it was made: `scratch.img` a raw ext4 image of its own,
 * `scratch.clone` a copy-on-write child of a template's disk made by the backend's `cloneDisk`
 * (in the backend's format; the VM is told so, never left to guess it from the file).
 */
export const SCRATCH_DISK = { raw: 'scratch.img', clone: 'scratch.clone' } as const;

/** An instance's disk by its name, whichever way it was made. */
export function isScratchDisk(name: string): boolean {
  return /^scratch\.[a-z0-9]+$/.test(name);
}
