/**
 * Firecracker backend: one detached `firecracker` process per VM, KVM only, configured and
 * controlled over its REST API on a unix socket (`src/api.ts`). The agent and data channels
 * are vsock ports 1024 and 1025, reached through the vsock device's host socket with
 * Firecracker's `CONNECT <port>` handshake (`src/vsock.ts`). This file is the `Backend`: what
 * a VM may ask for, and making, finding and cleaning up VMs; whether Firecracker is offered is
 * probe.ts, its API configuration config.ts, a running VM vm.ts.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { AegisError } from '@aegis/protocol';
import {
  DetachedProcess,
  findStrays,
  type SpawnFn,
  type StrayProcess,
  type Backend,
  type Probe,
  type Vm,
  type VmConfig,
  type VmRecord,
  KERNEL_CMDLINE_MAX_BYTES,
} from '@aegis/vmm';
import { bootArgs, linkDisks, restoreMemoryPath } from './config.js';
import { BINARY, findBinary, isFile, probe } from './probe.js';
import { FirecrackerVm, isOurFirecracker, parseRecord } from './vm.js';

const execFileP = promisify(execFile);

/** Firecracker's own rule for `--id` (it refuses to start otherwise). */
const ID_PATTERN = /^[A-Za-z0-9-]{1,64}$/;

/** Starts the VMM process; replaceable so tests can run a stand-in for `firecracker`. */
export type SpawnVmm = SpawnFn;

export interface FirecrackerOptions {
  /** The firecracker binary; default `$AEGIS_FIRECRACKER`, else `firecracker` on PATH. */
  binary?: string;
  spawn?: SpawnVmm;
  /** How long `connectAgent`/`connectData` keep trying while the guest boots. Default 60 s. */
  connectTimeoutMs?: number;
  /**
   * The guest kernel (uncompressed vmlinux) that `probe` boots once to find out whether KVM can
   * run it. Without it (or without `cacheDir`) KVM cannot be tested, and the backend is not
   * offered unless AEGIS_ACCEL=kvm.
   */
  kernelPath?: string;
  /** Where the verdict of that test is kept (`accel-verdicts.json`, shared with the QEMU backend). */
  cacheDir?: string;
  /** The KVM device node. Default `/dev/kvm`. */
  kvmDevice?: string;
  /** How long the test boot may take to reach the guest's root mount. Default 5 s. */
  kvmTestTimeoutMs?: number;
}

export class FirecrackerBackend implements Backend {
  readonly name = 'firecracker' as const;

  constructor(private readonly options: FirecrackerOptions = {}) {}

  probe(): Promise<Probe> {
    return probe(this.name, this.options);
  }

  async create(config: VmConfig, signal?: AbortSignal): Promise<Vm> {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'create cancelled');
    if (!ID_PATTERN.test(config.id)) {
      throw new AegisError('INVALID_ARGUMENT', `VM id ${JSON.stringify(config.id)}: Firecracker takes 1 to 64 letters, digits and dashes`);
    }
    if (config.network !== 'none') {
      throw new AegisError(
        'UNSUPPORTED',
        `the Firecracker backend has no ${config.network} networking: Firecracker needs a TAP device, which passt cannot drive without root; use the default network (the egress policy needs no network device) or --network none, or the QEMU backend`,
      );
    }
    if (config.scratchDiskCloned) {
      throw new AegisError(
        'UNSUPPORTED',
        'Firecracker attaches raw disk images only, and this backend makes no disk clones: give the VM a raw scratch disk (a clone of a template needs a raw copy, e.g. cp --reflink=auto)',
      );
    }
    if (config.restoreFrom && config.snapshotMemory?.access === 'write') {
      throw new AegisError(
        'UNSUPPORTED',
        'Firecracker maps a snapshot memory file privately (copy-on-write): a restored VM cannot write its RAM back to the file',
      );
    }
    const volumes = config.volumes ?? [];
    if (volumes.some((v) => v.kind !== 'disk')) {
      throw new AegisError(
        'UNSUPPORTED',
        'the Firecracker backend cannot share a host directory (Firecracker has no 9p or virtio-fs device); use a named volume, or the QEMU backend',
      );
    }
    if (config.restoreFrom && volumes.length > 0) {
      throw new AegisError('UNSUPPORTED', 'a VM restored from a snapshot cannot gain volumes; boot it cold');
    }
    const cmdlineBytes = Buffer.byteLength(bootArgs(config).join(' ')) + 40 * (3 + volumes.length);
    if (cmdlineBytes > KERNEL_CMDLINE_MAX_BYTES) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `the volumes' guest paths make the kernel command line too long (${cmdlineBytes} of ${KERNEL_CMDLINE_MAX_BYTES} bytes); use shorter paths`,
      );
    }
    const memoryPath = restoreMemoryPath(config);
    if (config.restoreFrom && memoryPath) {
      for (const [what, file] of [
        ['snapshot', config.restoreFrom],
        ['snapshot memory file', memoryPath],
      ] as const) {
        if (!(await isFile(file))) throw new AegisError('NOT_FOUND', `${what} ${file} does not exist`);
      }
    }
    const found = await findBinary(this.options.binary);
    if (!found.binary) throw new AegisError('UNAVAILABLE', found.missing ?? 'firecracker not found');
    await linkDisks(config);
    return new FirecrackerVm(config.id, config.stateDir, {
      binary: found.binary,
      ...(this.options.spawn ? { spawn: this.options.spawn } : {}),
      config,
      connectTimeoutMs: this.options.connectTimeoutMs ?? 60_000,
    });
  }

  async attach(record: VmRecord, signal?: AbortSignal): Promise<Vm> {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'attach cancelled');
    const r = parseRecord(record);
    if (!r) throw new AegisError('INVALID_ARGUMENT', 'not a Firecracker VM record');
    const proc = await DetachedProcess.adopt(r, isOurFirecracker(r.id, r.stateDir));
    if (!proc) throw new AegisError('NOT_FOUND', `Firecracker process of VM ${r.id} is gone`);
    const snapshotMemory = r.memoryFile ? { path: r.memoryFile, access: 'write' as const } : undefined;
    const vm = new FirecrackerVm(r.id, r.stateDir, undefined, {
      connectTimeoutMs: this.options.connectTimeoutMs ?? 60_000,
      snapshotMemory,
    });
    vm.adopt(proc);
    return vm;
  }

  /**
   * A checkpoint's own disk: Firecracker's disks are raw files (this backend makes no clones),
   * so a sparse copy, shared blocks where the filesystem can (reflink), holes kept.
   */
  async copyDisk(source: string, sourceCloned: boolean, dest: string, signal?: AbortSignal): Promise<void> {
    if (sourceCloned) throw new AegisError('UNSUPPORTED', 'the Firecracker backend has no disk clones to copy');
    try {
      await execFileP('cp', ['--sparse=always', '--reflink=auto', '--', source, dest], { timeout: 600_000, ...(signal ? { signal } : {}) });
      await fs.chmod(dest, 0o600);
    } catch (err) {
      await fs.rm(dest, { force: true });
      throw new AegisError('UNAVAILABLE', `cannot copy the VM's disk: ${(err as Error).message}`);
    }
  }

  async strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]> {
    const kept = keep.map(parseRecord).flatMap((r) => (r ? [{ identity: r, stateDir: r.stateDir }] : []));
    return findStrays(dir, kept, (argv) =>
      path.basename(argv[0] ?? '') === BINARY && argv.includes('--api-sock') ? { what: 'Firecracker', helper: false } : undefined,
    );
  }
}
