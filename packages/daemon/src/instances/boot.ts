/**
 * Starting a VM for an instance or the pool: the machine shape, its disk (new, a copy-on-write
 * child of a template made by the backend, or its own kept one on a restart) and the VMM; and
 * the fresh identity a restored clone is given. Every step takes the start's signal: a
 * cancelled start stops here.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError, type FreshParams } from '@aegis/protocol';
import type { NetworkMode } from '@aegis/protocol/api';
import type { Backend, Vm, VmVolume } from '@aegis/vmm';
import type { DaemonConfig } from '../config.js';
import type { ResolvedImage } from '../images/service.js';
import { isScratchDisk, makeScratchDisk, SCRATCH_DISK } from './disks.js';
import { vmNetwork } from './network.js';
import { existingDisk } from './spec.js';
import type { MachineShape, Template, TemplateCache } from './templates.js';

/** Which VM to start, for whom, and from what. */
export interface VmPlan {
  id: string;
  /** Its name (a cold boot's hostname; a restored one gets it from `fresh`). */
  handle: string;
  /** The instance's directory: the disk and `vm/` (sockets, pid file) live there. */
  dir: string;
  shape: MachineShape;
  /** Restore from this template (then `fresh`), else boot cold. */
  template?: Template | undefined;
  /** Boot on the instance's own kept disk (a restart). */
  keepDisk?: boolean;
  /** Host directories and named volumes (never with a template: a restored VM cannot gain devices). */
  volumes?: VmVolume[];
}

/** A VM's identity, made fresh for each instance restored from a template (or claimed from the pool). */
export function freshIdentity(hostname: string): FreshParams {
  return { timeMs: Date.now(), hostname, entropy: randomBytes(64).toString('base64') };
}

/** The machine an instance of these settings runs on (what templates and the pool are keyed by). */
export async function machineShape(
  config: Pick<DaemonConfig, 'kernelPath' | 'rootfsPath' | 'scratchDiskMiB'>,
  memoryMiB: number,
  vcpuCount: number,
  network: NetworkMode,
  image: ResolvedImage | undefined,
): Promise<MachineShape> {
  return {
    kernelPath: await fs.realpath(config.kernelPath),
    rootfsPath: await fs.realpath(config.rootfsPath),
    memoryMiB,
    vcpuCount,
    scratchDiskMiB: config.scratchDiskMiB,
    network,
    ...(image ? { imageDiskPath: image.fsPath } : {}),
  };
}

/**
 * Makes the VM's disk and starts its VMM (a restore when `template` is given), not yet
 * connected to. The caller owns the VM from the moment this returns.
 */
export async function startVm(ctx: { backend: Backend; templates: TemplateCache }, plan: VmPlan, signal: AbortSignal): Promise<Vm> {
  const { id, handle, dir, shape, template, keepDisk = false, volumes = [] } = plan;
  const vmDir = path.join(dir, 'vm');
  await fs.rm(vmDir, { recursive: true, force: true });
  await fs.mkdir(vmDir, { recursive: true, mode: 0o700 });
  // A kept disk is the instance's own: raw, or a child of the template it was cloned from.
  const kept = keepDisk ? await existingDisk(dir) : undefined;
  if (!kept) {
    for (const name of await fs.readdir(dir)) if (isScratchDisk(name)) await fs.rm(path.join(dir, name), { force: true });
  }
  const cloned = kept?.cloned ?? template !== undefined;
  const scratch = kept?.path ?? path.join(dir, cloned ? SCRATCH_DISK.clone : SCRATCH_DISK.raw);
  if (!kept && template) {
    if (!ctx.backend.cloneDisk) throw new AegisError('UNSUPPORTED', `the ${ctx.backend.name} backend cannot clone a template's disk`);
    // Registered first: the template's directory then outlives every disk made from it.
    await ctx.templates.reference(template, scratch);
    await ctx.backend.cloneDisk(template.scratch, scratch, signal);
  } else if (!kept) await makeScratchDisk(scratch, shape.scratchDiskMiB);
  signal.throwIfAborted();
  const vm = await ctx.backend.create(
    {
      id,
      stateDir: vmDir,
      kernelPath: shape.kernelPath,
      rootfsPath: shape.rootfsPath,
      scratchDiskPath: scratch,
      ...(cloned ? { scratchDiskCloned: true } : {}),
      memoryMiB: shape.memoryMiB,
      vcpuCount: shape.vcpuCount,
      ...(shape.imageDiskPath ? { imageDiskPath: shape.imageDiskPath } : {}),
      ...(volumes.length > 0 ? { volumes } : {}),
      // A restored machine must match its template's exactly (its command line included); it
      // gets its name from `fresh`.
      ...(template
        ? { network: vmNetwork(shape.network).network, dataLink: vmNetwork(shape.network).dataLink, kernelArgs: [] }
        : withArgs(vmNetwork(shape.network), `aegis_hostname=${handle}`)),
      ...(template ? { restoreFrom: template.snapshot, snapshotMemory: { path: template.memory, access: 'map' as const } } : {}),
    },
    signal,
  );
  signal.throwIfAborted();
  try {
    await vm.start(signal);
  } catch (err) {
    await vm.stop({ timeoutMs: 0 }).catch(() => undefined);
    throw err;
  }
  return vm;
}

function withArgs<N extends { kernelArgs: string[] }>(net: N, ...args: string[]): N {
  return { ...net, kernelArgs: [...net.kernelArgs, ...args] };
}
