/**
 * The QEMU command line: the machine per architecture, the kernel command line, disks, volumes,
 * network, the agent and data ports, QMP and the console ring, all decided before QEMU starts.
 * Kept apart from the running VM so it can be tested without one (volumes.test.ts).
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import {
  guestNetKernelArg,
  passtPaths,
  type VmConfig,
  type VmVolume,
  KERNEL_CMDLINE_MAX_BYTES,
  virtioDiskName,
  volumeKernelArg,
} from '@aegis/vmm';

/** The names of the virtio-serial ports aegis-init looks for. */
export const AGENT_PORT_NAME = 'aegis.agent';
export const DATA_PORT_NAME = 'aegis.data';

interface ArchProfile {
  binary: string;
  machine: string;
  /** Kernel console device for early and panic messages. */
  console: string;
  /** How many virtio devices the machine can take (each is one virtio-mmio transport). */
  virtioSlots: number;
  /** The CPU model under TCG (under KVM: the host's). */
  tcgCpu: string;
}

/**
 * Under TCG on x86, `max` without ERMS. With ERMS the guest kernel copies user memory (every read,
 * write, send and recv) and glibc copies anything over a few KiB with `rep movsb`, and TCG runs
 * a rep string instruction one element per iteration of a translated block: a byte at a time.
 * Without it they use `rep movsq` (8 bytes an iteration) and vector loops. Measured (a sampler
 * in the guest during an egress download): copy_user_enhanced_fast_string 17% of the guest's
 * time, its replacement 4.5%.
 */
const X64_TCG_CPU = 'max,erms=off';

const ARCH: Record<string, ArchProfile> = {
  // microvm boots fastest under TCG (see shared notes). acpi=off makes QEMU describe each
  // virtio-mmio device on the kernel command line; rtc stays on (turning it off cost 1.8 s).
  // Without ACPI it has 8 transports (IRQs 12 down to 5); `ioapic2=on` does not add any then.
  x64: {
    binary: 'qemu-system-x86_64',
    machine: 'microvm,acpi=off,x-option-roms=off,rtc=on',
    console: 'ttyS0',
    virtioSlots: 8,
    tcgCpu: X64_TCG_CPU,
  },
  arm64: { binary: 'qemu-system-aarch64', machine: 'virt,gic-version=max', console: 'ttyAMA0', virtioSlots: 32, tcgCpu: 'max' },
};

export function profile(): ArchProfile {
  const p = ARCH[process.arch];
  if (!p) throw new AegisError('UNSUPPORTED', `QEMU backend does not support ${process.arch}`);
  return p;
}

/**
 * Under TCG the guest's TSC runs at the host's rate; telling the kernel that rate up front
 * avoids a calibration loop that hung 4 boots in 10 on microvm (shared notes).
 */
async function hostTscKhz(): Promise<number | undefined> {
  if (process.arch !== 'x64') return undefined;
  const cpuinfo = await fs.readFile('/proc/cpuinfo', 'utf8').catch(() => '');
  const m = /^cpu MHz\s*:\s*([\d.]+)/m.exec(cpuinfo);
  return m?.[1] ? Math.round(Number(m[1]) * 1000) : undefined;
}

/** The serial console's ring (a power of two, as QEMU requires). */
export const CONSOLE_RING = 'console0';
export const CONSOLE_RING_BYTES = 1 << 20;

export function paths(
  stateDir: string,
  id: string,
): { qmp: string; agent: string; data: string; vmmLog: string; netDir: string; net: string } {
  const net = passtPaths(stateDir, id);
  return {
    netDir: net.dir,
    net: net.socket,
    qmp: path.join(stateDir, 'qmp.sock'),
    agent: path.join(stateDir, 'agent.sock'),
    data: path.join(stateDir, 'data.sock'),
    vmmLog: path.join(stateDir, 'qemu.log'),
  };
}

/** A value inside a QEMU option list (`-drive a=b,c=d`): commas are doubled. */
const optValue = (v: string): string => v.replaceAll(',', ',,');

/**
 * Host directories are 9p exports of QEMU itself (no helper process). `mapped-xattr`: QEMU
 * creates every file as its own user, with host mode 0644 (directories 0755), and keeps the
 * guest's owner, mode, device numbers and symlink targets in `user.virtfs.*` xattrs, so what
 * the guest makes (setuid files, device nodes, symlinks) is a plain file on the host.
 * `multidevs=remap` keeps inode numbers unique when the directory spans file systems.
 * docs/design.md, "Volumes", has the measurements and the reasoning.
 */
function shareArgs(v: VmVolume, tag: string): string[] {
  const fsdev = `local,id=${tag},path=${optValue(v.hostPath)},security_model=mapped-xattr,multidevs=remap,fmode=0644,dmode=0755`;
  return ['-fsdev', v.readOnly ? `${fsdev},readonly=on` : fsdev, '-device', `virtio-9p-device,fsdev=${tag},mount_tag=${tag}`];
}

/**
 * The volumes' devices and the `aegis_volN=` words telling aegis-init where to mount them.
 * Shares go before every other device: on microvm the fifth transport shares IRQ 8 with the
 * RTC, which only drivers probing before rtc_cmos (block, net, console, rng) can take; 9p's
 * probes after it and failed there with EBUSY. Disks come after the image disk, so the
 * fixed ones keep their names (vda root, vdb scratch, vdc image).
 */
function volumeArgs(config: VmConfig, arch: ArchProfile): { shares: string[]; disks: string[]; kernelArgs: string[] } {
  const volumes = config.volumes ?? [];
  if (volumes.length === 0) return { shares: [], disks: [], kernelArgs: [] };
  // Restored: the same volumes as when it was saved (the caller's promise), the same devices.
  // root, scratch, rng, the agent's virtio-serial, and the image disk and network device when present.
  const fixed = 4 + (config.imageDiskPath ? 1 : 0) + (config.network === 'user' ? 1 : 0);
  const free = arch.virtioSlots - fixed;
  if (volumes.length > free) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `this instance can have at most ${free} volumes: QEMU's ${arch.machine.split(',')[0]} machine has ${arch.virtioSlots} device slots` +
        ` and ${fixed} are taken (disks, the agent channel, entropy${config.network === 'user' ? ', the network' : ''}${config.imageDiskPath ? ', the image' : ''})`,
    );
  }
  const shares: string[] = [];
  const disks: string[] = [];
  const kernelArgs: string[] = [];
  let disk = config.imageDiskPath ? 3 : 2;
  for (const [i, v] of volumes.entries()) {
    const tag = `aegis${i}`;
    if (v.kind === 'share') {
      shares.push(...shareArgs(v, tag));
      kernelArgs.push(volumeKernelArg(i, '9p', tag, v.readOnly, v.guestPath));
    } else {
      const drive = `id=${tag},file=${optValue(v.hostPath)},format=raw,if=none,discard=unmap${v.readOnly ? ',readonly=on' : ''}`;
      disks.push('-drive', drive, '-device', `virtio-blk-device,drive=${tag}`);
      kernelArgs.push(volumeKernelArg(i, 'ext4', virtioDiskName(disk++), v.readOnly, v.guestPath));
    }
  }
  return { shares, disks, kernelArgs };
}

/** The whole QEMU command line for `config` (exported for its tests). */
export async function qemuArgs(config: VmConfig, kvm: boolean): Promise<string[]> {
  const p = paths(config.stateDir, config.id);
  const arch = profile();
  const volumes = volumeArgs(config, arch);
  const tscKhz = kvm ? undefined : await hostTscKhz();
  const mem = config.snapshotMemory;
  if (mem) shellSafe(mem.path);
  const cmdline = [
    `console=${arch.console}`,
    'quiet',
    'panic=-1', // with -no-reboot, a guest panic ends QEMU instead of hanging
    'reboot=t', // no ACPI on microvm: the harness ends the VM by a triple-fault reset
    'cryptomgr.notests',
    'root=/dev/vda',
    'rootfstype=erofs',
    'ro',
    'init=/aegis/init',
    ...(tscKhz ? [`tsc_early_khz=${tscKhz}`] : []),
    ...(config.network === 'user' ? [guestNetKernelArg()] : []),
    ...(config.imageDiskPath ? [`aegis_image=${virtioDiskName(2)}`] : []),
    ...volumes.kernelArgs,
    ...config.kernelArgs,
  ];
  // QEMU appends one `virtio_mmio.device=512@0xfeb00e00:12` (~36 bytes) per device.
  const cmdlineBytes = Buffer.byteLength(cmdline.join(' ')) + 40 * arch.virtioSlots;
  if (cmdlineBytes > KERNEL_CMDLINE_MAX_BYTES) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `the volumes' guest paths make the kernel command line too long (${cmdlineBytes} of ${KERNEL_CMDLINE_MAX_BYTES} bytes); use shorter paths`,
    );
  }
  return [
    '-name',
    `aegis-${config.id},process=aegis-vm-${config.id}`,
    '-machine',
    mem ? `${arch.machine},memory-backend=mem0` : arch.machine,
    ...(mem
      ? [
          '-object',
          `memory-backend-file,id=mem0,size=${config.memoryMiB}M,mem-path=${mem.path},share=${mem.access === 'write' ? 'on' : 'off'}`,
        ]
      : []),
    ...(kvm ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg', '-cpu', arch.tcgCpu]),
    '-m',
    String(config.memoryMiB),
    '-smp',
    String(config.vcpuCount),
    '-nodefaults',
    '-no-user-config',
    '-nographic',
    '-no-reboot',
    '-kernel',
    config.kernelPath,
    '-append',
    cmdline.join(' '),
    ...volumes.shares,
    '-drive',
    `id=root,file=${config.rootfsPath},format=raw,if=none,readonly=on`,
    '-device',
    'virtio-blk-device,drive=root',
    '-drive',
    `id=scratch,file=${config.scratchDiskPath},format=${config.scratchDiskCloned ? 'qcow2' : 'raw'},if=none,discard=unmap`,
    '-device',
    'virtio-blk-device,drive=scratch',
    ...(config.imageDiskPath
      ? ['-drive', `id=image,file=${config.imageDiskPath},format=raw,if=none,readonly=on`, '-device', 'virtio-blk-device,drive=image']
      : []),
    ...volumes.disks,
    '-device',
    'virtio-rng-device',
    ...(config.network === 'user'
      ? [
          '-netdev',
          `stream,id=net0,server=off,addr.type=unix,addr.path=${p.net}`,
          '-device',
          // A fixed MAC: every clone of a snapshot template has its template's anyway.
          'virtio-net-device,netdev=net0,mac=02:ae:00:00:00:01',
        ]
      : []),
    '-device',
    // Port 0 is reserved for a console: two ports of ours need three.
    'virtio-serial-device,max_ports=3',
    '-chardev',
    `socket,id=agent,path=${p.agent},server=on,wait=off`,
    '-device',
    `virtserialport,chardev=agent,name=${AGENT_PORT_NAME}`,
    '-chardev',
    `socket,id=data,path=${p.data},server=on,wait=off`,
    '-device',
    `virtserialport,chardev=data,name=${DATA_PORT_NAME}`,
    '-qmp',
    `unix:${p.qmp},server=on,wait=off`,
    // The guest can print to its console as fast as it likes (a 0.5–0.7 MB/s flood was
    // measured): a ring in QEMU bounds it, whoever reads it and whether aegisd runs or not.
    '-chardev',
    `ringbuf,id=${CONSOLE_RING},size=${CONSOLE_RING_BYTES}`,
    '-serial',
    `chardev:${CONSOLE_RING}`,
    // With RAM in a file, the device state is loaded after x-ignore-shared is set (over QMP).
    ...(config.restoreFrom ? ['-incoming', mem ? 'defer' : `exec:cat ${shellSafe(config.restoreFrom)}`] : []),
  ];
}

/** QEMU runs `exec:` migration URIs through /bin/sh: only plain paths may go there. */
export function shellSafe(file: string): string {
  if (!/^[\w./+-]+$/.test(file)) throw new AegisError('INVALID_ARGUMENT', `snapshot path ${file} has characters QEMU's exec: cannot take`);
  return file;
}
