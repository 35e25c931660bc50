/**
 * What Firecracker is told through its API before the guest runs: the kernel command line, the
 * machine, drives and vsock of a cold boot (`bootRequests`), or the snapshot a restore loads
 * (`restoreRequest`), and where snapshot RAM is written and mapped from.
 *
 * Firecracker runs with its working directory set to the VM's state directory, and every path
 * it records in a snapshot (the disks, the vsock socket) is relative to it: a VM restored in
 * another state directory then finds its own disks and binds its own socket, which is what the
 * jailer's chroot achieves for Firecracker's own users.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { type VmConfig, virtioDiskName, volumeKernelArg } from '@aegis/vmm';

/** The vsock ports aegis-init listens on (docs/backends.md). */
export const AGENT_VSOCK_PORT = 1024;
export const DATA_VSOCK_PORT = 1025;
/**
 * The guest's vsock address. Only the guest sees it, and each VM has its own host socket, so
 * every VM (and every clone of a snapshot) can have the same one: 3, the first non-reserved CID.
 */
const GUEST_CID = 3;

/**
 * Our kernel command line. Firecracker appends its own words: a `virtio_mmio.device=` entry per
 * device on x86_64 (the device tree on arm64), and `root=/dev/vda ro` only for a drive marked
 * `is_root_device`, which ours are not (see `bootConfig`). `reboot=k`: a guest reboot or
 * poweroff resets through the i8042 controller, and Firecracker exits with status 0;
 * `panic=-1` turns a panic into that same reset instead of a hang.
 */
// aegis_agent=vsock: aegis-init then serves the agent and data channels on vsock 1024/1025.
const BASE_BOOT_ARGS = [
  'console=ttyS0',
  'reboot=k',
  'panic=-1',
  'pci=off',
  'root=/dev/vda',
  'rootfstype=erofs',
  'ro',
  'init=/aegis/init',
  'aegis_agent=vsock',
];

/**
 * Names inside the state directory. The disks are symlinks to the caller's files, given to
 * Firecracker by these relative names (see the top of this file).
 */
const DISK = { rootfs: 'rootfs.disk', scratch: 'scratch.disk', image: 'image.disk' } as const;
/** The state directory's name for the n-th volume's disk, like the fixed ones. */
const volumeDisk = (i: number): string => `volume${i}.disk`;
const VSOCK_NAME = 'vsock.sock';

export function paths(stateDir: string): { api: string; vsock: string; log: string } {
  return {
    api: path.join(stateDir, 'fc.sock'),
    vsock: path.join(stateDir, VSOCK_NAME),
    // Firecracker's stdout and stderr: the guest's serial console and Firecracker's own log.
    log: path.join(stateDir, 'firecracker.log'),
  };
}

/**
 * Where a restore maps guest RAM from: `snapshotMemory` when given, else the file
 * `saveSnapshot` wrote next to the snapshot. Firecracker maps it privately: pages are read on
 * demand, never copied, and the guest's writes never reach the file.
 */
export function restoreMemoryPath(config: VmConfig): string | undefined {
  if (!config.restoreFrom) return undefined;
  return config.snapshotMemory ? path.resolve(config.snapshotMemory.path) : `${path.resolve(config.restoreFrom)}.mem`;
}

/**
 * Where `saveSnapshot` writes guest RAM. Firecracker cannot back a running guest's RAM with a
 * file (it is anonymous memory until a snapshot writes it out), so it writes it at snapshot time
 * to the `write` file the caller named; else next to the snapshot. Never to a `map` file: other
 * clones may be mapping it.
 */
export function snapshotMemoryPath(memory: VmConfig['snapshotMemory'], snapshotPath: string): string {
  return memory?.access === 'write' ? path.resolve(memory.path) : `${snapshotPath}.mem`;
}

/** Points the state directory's disk names at this VM's files (see the top of this file). */
export async function linkDisks(config: VmConfig): Promise<void> {
  const links: [string, string | undefined][] = [
    [DISK.rootfs, config.rootfsPath],
    [DISK.scratch, config.scratchDiskPath],
    [DISK.image, config.imageDiskPath],
    ...(config.volumes ?? []).map((v, i): [string, string] => [volumeDisk(i), v.hostPath]),
  ];
  for (const [name, target] of links) {
    const link = path.join(config.stateDir, name);
    await fs.rm(link, { force: true });
    if (target) await fs.symlink(path.resolve(target), link);
  }
}

/**
 * Our command line, `aegis_image=` naming the image's disk when there is one, and one
 * `aegis_volN=` word per volume: its drive is added after the fixed ones, in order, so the
 * guest names it vdd, vde... (vdc without an image).
 */
export function bootArgs(config: VmConfig): string[] {
  const first = config.imageDiskPath ? 3 : 2;
  const volumes = (config.volumes ?? []).map((v, i) => volumeKernelArg(i, 'ext4', virtioDiskName(first + i), v.readOnly, v.guestPath));
  return [...BASE_BOOT_ARGS, ...(config.imageDiskPath ? [`aegis_image=${virtioDiskName(2)}`] : []), ...volumes, ...config.kernelArgs];
}

/** The configuration requests of a cold boot, in order (drive order is guest device order). */
export function bootRequests(config: VmConfig): { path: string; body: unknown }[] {
  // is_root_device false on every drive: Firecracker would move a root drive to the front and
  // append `root=/dev/vda ro` itself; our own command line already says that (and rootfstype),
  // so the drives keep the order they are added in: rootfs vda, scratch vdb, image vdc.
  const drive = (id: string, file: string, readOnly: boolean): { path: string; body: unknown } => ({
    path: `/drives/${id}`,
    body: {
      drive_id: id,
      path_on_host: file,
      is_root_device: false,
      is_read_only: readOnly,
      // Firecracker's default (Unsafe) ignores the guest's flushes; the scratch disk may be
      // kept across restarts, so its fsyncs reach the host's disk.
      ...(readOnly ? {} : { cache_type: 'Writeback' }),
    },
  });
  return [
    { path: '/machine-config', body: { vcpu_count: config.vcpuCount, mem_size_mib: config.memoryMiB, smt: false } },
    {
      path: '/boot-source',
      body: { kernel_image_path: path.resolve(config.kernelPath), boot_args: bootArgs(config).join(' ') },
    },
    drive('rootfs', DISK.rootfs, true),
    drive('scratch', DISK.scratch, false),
    ...(config.imageDiskPath ? [drive('image', DISK.image, true)] : []),
    ...(config.volumes ?? []).map((v, i) => drive(`volume${i}`, volumeDisk(i), v.readOnly)),
    // Relative: Firecracker binds it in its working directory, this VM's state directory.
    { path: '/vsock', body: { guest_cid: GUEST_CID, uds_path: VSOCK_NAME } },
    // The guest's entropy source, as QEMU's virtio-rng-device.
    { path: '/entropy', body: {} },
  ];
}

/** The request that resumes a snapshot instead of booting (Firecracker's `SnapshotLoadParams`). */
export function restoreRequest(snapshotPath: string, memoryPath: string): { path: string; body: unknown } {
  return {
    path: '/snapshot/load',
    body: {
      snapshot_path: path.resolve(snapshotPath),
      // `File`: Firecracker maps the file MAP_PRIVATE, so the guest's writes never reach it.
      mem_backend: { backend_type: 'File', backend_path: memoryPath },
      resume_vm: true,
    },
  };
}
