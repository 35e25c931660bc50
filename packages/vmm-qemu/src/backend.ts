/**
 * QEMU backend: one detached QEMU process per VM, `microvm` machine on x86_64 (`virt` on
 * arm64), KVM when a test boot showed it can run the guest and TCG otherwise (kvm-test.ts). Control through QMP; the agent
 * channel is a virtio-serial port whose host end is a unix socket QEMU listens on.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';
import {
  KVM_DEVICE,
  verdictGate,
  type VerdictGate,
  accelMode,
  kvmDeviceProblem,
  verdictKey,
  DetachedProcess,
  Passt,
  PASST_INSTALL_HINT,
  findStrays,
  guestNetKernelArg,
  isPasst,
  passtAvailable,
  passtPaths,
  type ProcessExit,
  type ProcessIdentity,
  type StrayProcess,
  type Backend,
  type Capabilities,
  type Probe,
  type Vm,
  type VmConfig,
  type VmExit,
  type VmRecord,
  type VmVolume,
  KERNEL_CMDLINE_MAX_BYTES,
  virtioDiskName,
  volumeKernelArg,
} from '@aegis/vmm';
import { QmpClient, type QmpEvent } from './qmp.js';
import { testKvmBoot } from './kvm-test.js';

const execFileP = promisify(execFile);

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
}

const ARCH: Record<string, ArchProfile> = {
  // microvm boots fastest under TCG (see shared notes). acpi=off makes QEMU describe each
  // virtio-mmio device on the kernel command line; rtc stays on (turning it off cost 1.8 s).
  // Without ACPI it has 8 transports (IRQs 12 down to 5); `ioapic2=on` does not add any then.
  x64: { binary: 'qemu-system-x86_64', machine: 'microvm,acpi=off,x-option-roms=off,rtc=on', console: 'ttyS0', virtioSlots: 8 },
  arm64: { binary: 'qemu-system-aarch64', machine: 'virt,gic-version=max', console: 'ttyAMA0', virtioSlots: 32 },
};

function profile(): ArchProfile {
  const p = ARCH[process.arch];
  if (!p) throw new AegisError('UNSUPPORTED', `QEMU backend does not support ${process.arch}`);
  return p;
}

/** Whether VMs get KVM, and why, in one line for `doctor` and `status`. */
interface AccelDecision {
  kvm: boolean;
  why: string;
  /** The test boot still running: TCG until it settles. */
  settled?: Promise<AccelDecision>;
}

/** A working KVM reaches init in well under a second; this leaves room for a loaded host. */
const KVM_TEST_DEADLINE_MS = 5000;

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
const CONSOLE_RING = 'console0';
export const CONSOLE_RING_BYTES = 1 << 20;

function capabilitiesFor(kvm: boolean, passt: boolean): Capabilities {
  return {
    pause: true,
    snapshot: true,
    survivesDaemonRestart: true,
    agentTransport: 'virtio-serial',
    acceleration: kvm ? 'kvm' : 'tcg',
    networkModes: passt ? ['user', 'none'] : ['none'],
    // qcow2 children (`qemu-img create -b`): a clone's disk in a few milliseconds.
    diskClones: true,
    volumeKinds: ['disk', 'share'],
  };
}

interface QemuRecord extends ProcessIdentity {
  backend: 'qemu';
  id: string;
  stateDir: string;
}

function parseRecord(record: VmRecord): QemuRecord | undefined {
  const r = record as Partial<QemuRecord>;
  if (r.backend !== 'qemu' || typeof r.pid !== 'number' || typeof r.id !== 'string' || typeof r.stateDir !== 'string') return undefined;
  return {
    backend: 'qemu',
    id: r.id,
    pid: r.pid,
    stateDir: r.stateDir,
    ...(typeof r.startTicks === 'number' ? { startTicks: r.startTicks } : {}),
  };
}

/** A reused pid is not our VM: QEMU's command line names the VM (`-name aegis-<id>,`). */
const isOurQemu =
  (id: string) =>
  (argv: string[]): boolean =>
    argv.some((a) => a.startsWith(`aegis-${id},`));

function paths(stateDir: string, id: string): { qmp: string; agent: string; data: string; vmmLog: string; netDir: string; net: string } {
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

export interface QemuBackendOptions {
  binary?: string;
  /** The guest kernel: what the KVM test boots. Without it KVM cannot be tested (TCG). */
  kernelPath?: string;
  /** Where KVM verdicts are kept (`accel-verdicts.json`). Without it KVM is never tested. */
  cacheDir?: string;
  kvmDevice?: string;
  kvmTestDeadlineMs?: number;
}

export class QemuBackend implements Backend {
  readonly name = 'qemu' as const;
  /** Settled decision for VMs created from now on; undefined until first asked. */
  private accel: AccelDecision | undefined;
  private readonly gate: VerdictGate | undefined;

  constructor(private readonly options: QemuBackendOptions = {}) {
    this.gate = options.cacheDir ? verdictGate(options.cacheDir) : undefined;
  }

  /**
   * KVM or TCG, and why. A cached verdict answers at once; otherwise the test boot starts in
   * the background and VMs boot under TCG until it settles, so nothing fails on first contact.
   */
  private async decideAccel(version: string): Promise<AccelDecision> {
    if (this.accel) return this.accel;
    const device = this.options.kvmDevice ?? KVM_DEVICE;
    const mode = accelMode();
    const problem = mode === 'tcg' ? undefined : await kvmDeviceProblem(device);
    let d: AccelDecision;
    if (mode === 'tcg') d = { kvm: false, why: 'TCG (AEGIS_ACCEL=tcg)' };
    else if (problem) d = { kvm: false, why: `TCG (software emulation): ${problem}` };
    else if (mode === 'kvm') d = { kvm: true, why: 'KVM (AEGIS_ACCEL=kvm: used without a test boot)' };
    else if (!this.gate || !this.options.kernelPath)
      d = { kvm: false, why: `TCG: ${device} present but not tested (no guest kernel to test it with)` };
    else {
      const key = await verdictKey(version, this.options.kernelPath, device);
      const known = await this.gate.cached(this.name, key);
      if (known) d = fromVerdict(device, known.usable, known.detail);
      else {
        const gate = this.gate;
        const kernelPath = this.options.kernelPath;
        const settled = gate
          .decide(this.name, key, () =>
            testKvmBoot({
              binary: this.binary(),
              machine: profile().machine,
              console: profile().console,
              kernelPath,
              deadlineMs: this.options.kvmTestDeadlineMs ?? KVM_TEST_DEADLINE_MS,
            }),
          )
          .then(
            (v) => fromVerdict(device, v.usable, v.detail),
            (err: unknown) => ({ kvm: false, why: `TCG: the KVM test could not run: ${(err as Error).message}` }),
          )
          .then((final) => (this.accel = final));
        d = { kvm: false, why: `TCG while ${device} is being tested (a boot of the guest kernel under KVM)`, settled };
      }
    }
    this.accel = d;
    return d;
  }

  private binary(): string {
    return this.options.binary ?? profile().binary;
  }

  async probe(): Promise<Probe> {
    let binary: string;
    try {
      binary = this.options.binary ?? profile().binary;
    } catch (err) {
      return { available: false, detail: (err as Error).message };
    }
    let version: string;
    try {
      const { stdout } = await execFileP(binary, ['--version'], { timeout: 10_000 });
      version = stdout.split('\n')[0]?.trim() ?? binary;
    } catch {
      return { available: false, detail: `${binary} not found (Debian: apt-get install qemu-system-x86)` };
    }
    const passt = await passtAvailable();
    const answer = (accel: AccelDecision): Probe => ({
      available: true,
      detail: `${version}; ${accel.why}; ` + (passt ? 'network: passt' : `network: none (passt not found; ${PASST_INSTALL_HINT})`),
      capabilities: capabilitiesFor(accel.kvm, passt),
      accelerationReason: accel.why,
      version,
    });
    const accel = await this.decideAccel(version);
    const probe: Probe = { ...answer(accel), version };
    if (accel.settled) probe.settled = accel.settled.then(answer);
    return probe;
  }

  async create(config: VmConfig): Promise<Vm> {
    if (config.network === 'user' && !(await passtAvailable())) {
      throw new AegisError('UNSUPPORTED', `user networking needs passt (${PASST_INSTALL_HINT}); or start with --network none`);
    }
    const kvm = (this.accel ?? (await this.decideAccel(await qemuVersion(this.binary())))).kvm;
    const args = await qemuArgs(config, kvm);
    return new QemuVm(config.id, config.stateDir, {
      binary: this.binary(),
      args,
      kvm,
      ...(config.restoreFrom ? { restoreFrom: config.restoreFrom } : {}),
      ramInFile: config.snapshotMemory !== undefined,
      userNetwork: config.network === 'user',
    });
  }

  async attach(record: VmRecord): Promise<Vm> {
    const r = parseRecord(record);
    if (!r) throw new AegisError('INVALID_ARGUMENT', 'not a QEMU VM record');
    const proc = await DetachedProcess.adopt(r, isOurQemu(r.id));
    if (!proc) throw new AegisError('NOT_FOUND', `QEMU process of VM ${r.id} is gone`);
    const vm = new QemuVm(r.id, r.stateDir, undefined);
    await vm.adopt(proc);
    return vm;
  }

  /** A qcow2 child naming `base` (raw) as its backing file: the instance's own layer in milliseconds. */
  async cloneDisk(base: string, file: string): Promise<void> {
    try {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', file], { timeout: 30_000 });
      await fs.chmod(file, 0o600);
    } catch (err) {
      throw new AegisError('UNAVAILABLE', `cannot create the VM's disk (is qemu-utils installed?): ${(err as Error).message}`);
    }
  }

  async strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]> {
    const kept = keep.map(parseRecord).flatMap((r) => (r ? [{ identity: r, stateDir: r.stateDir }] : []));
    return findStrays(dir, kept, (argv) => {
      if (path.basename(argv[0] ?? '').startsWith('qemu-system')) return { what: 'QEMU', helper: false };
      // passt goes with its VM's QEMU (--one-off): a kept VM's is kept.
      return isPasst(argv) ? { what: 'passt', helper: true } : undefined;
    });
  }
}

function fromVerdict(device: string, usable: boolean, detail: string): AccelDecision {
  return usable
    ? { kvm: true, why: `KVM (tested: ${detail})` }
    : { kvm: false, why: `${device} present but it cannot run the guest: ${detail}; using TCG` };
}

async function qemuVersion(binary: string): Promise<string> {
  try {
    const { stdout } = await execFileP(binary, ['--version'], { timeout: 10_000 });
    return stdout.split('\n')[0]?.trim() ?? binary;
  } catch {
    return binary;
  }
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
  if (config.restoreFrom) throw new AegisError('UNSUPPORTED', 'a VM restored from a snapshot cannot gain volumes; boot it cold');
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
    ...(kvm ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', 'tcg', '-cpu', 'max']),
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
function shellSafe(file: string): string {
  if (!/^[\w./+-]+$/.test(file)) throw new AegisError('INVALID_ARGUMENT', `snapshot path ${file} has characters QEMU's exec: cannot take`);
  return file;
}

class QemuVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  private proc: DetachedProcess | undefined;
  private qmp: QmpClient | undefined;
  private shutdownEvent: QmpEvent | undefined;
  private stopRequested = false;
  private detached = false;
  /** Why the backend ended the VM itself (a KVM internal error). */
  private failure: string | undefined;
  private readonly p: ReturnType<typeof paths>;

  constructor(
    readonly id: string,
    private readonly stateDir: string,
    private readonly launch:
      { binary: string; args: string[]; kvm: boolean; restoreFrom?: string; ramInFile: boolean; userNetwork: boolean } | undefined,
  ) {
    this.p = paths(stateDir, id);
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
  }

  hostPid(): number | undefined {
    return this.proc?.pid;
  }

  record(): VmRecord {
    if (!this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const r: QemuRecord = { backend: 'qemu', id: this.id, ...this.proc.identity(), stateDir: this.stateDir };
    return { ...r };
  }

  async start(signal?: AbortSignal): Promise<void> {
    if (!this.launch || this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is already running`);
    // passt serves one client (`--one-off`): it exits with QEMU, so it needs no record of its own.
    const passt = this.launch.userNetwork ? await Passt.start(this.stateDir, this.id, signal) : undefined;
    const restoring = this.launch.restoreFrom !== undefined;
    const proc = await DetachedProcess.spawn(this.launch.binary, this.launch.args, { logFile: this.p.vmmLog, what: 'QEMU' }).catch(
      async (err: unknown) => {
        await passt?.kill();
        throw err;
      },
    );
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    try {
      await this.connectQmp(signal);
      if (restoring) await this.finishIncoming();
      if (this.launch.kvm) this.watchKvm();
    } catch (err) {
      proc.kill('SIGKILL');
      await passt?.kill();
      const tail = await fs.readFile(this.p.vmmLog, 'utf8').catch(() => '');
      throw new AegisError('UNAVAILABLE', `QEMU did not start: ${tail.trim().split('\n').slice(-3).join(' | ') || (err as Error).message}`);
    }
  }

  /** Waits for an incoming snapshot to be loaded, then lets the guest run. */
  private async finishIncoming(): Promise<void> {
    const qmp = this.requireQmp();
    if (this.launch?.ramInFile && this.launch.restoreFrom) {
      // RAM is the template's file, mapped copy-on-write: only device state is in the stream.
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
      await qmp.execute('migrate-incoming', { uri: `exec:cat ${shellSafe(this.launch.restoreFrom)}` });
    }
    const deadline = Date.now() + 60_000;
    for (;;) {
      const st = (await qmp.execute('query-status')) as { status?: string };
      if (st.status !== 'inmigrate') break;
      if (Date.now() > deadline) throw new AegisError('TIMEOUT', 'restoring the snapshot took over 60 s');
      await new Promise((r) => setTimeout(r, 5));
    }
    const mig = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
    if (mig.status === 'failed') throw new AegisError('INTERNAL', `snapshot restore failed: ${mig['error-desc'] ?? 'unknown'}`);
    await qmp.execute('cont');
  }

  async saveSnapshot(file: string): Promise<void> {
    const qmp = this.requireQmp();
    await qmp.execute('stop');
    if (this.launch?.ramInFile) {
      // RAM already lives in its (shared) file: leave it there, save only device state.
      await qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'x-ignore-shared', state: true }] });
    }
    // QEMU 7.2 has no file: migration URI; exec:cat writes the stream to the file.
    await qmp.execute('migrate', { uri: `exec:cat > ${shellSafe(file)}` });
    for (;;) {
      const st = (await qmp.execute('query-migrate')) as { status?: string; 'error-desc'?: string };
      if (st.status === 'completed') return;
      if (st.status === 'failed' || st.status === 'cancelled') {
        throw new AegisError('INTERNAL', `snapshot failed: ${st['error-desc'] ?? st.status}`);
      }
      await new Promise((r) => setTimeout(r, 20));
    }
  }

  /**
   * A KVM that fails in the middle of a VM's life (an internal error) stops the guest but not
   * QEMU, which then sits there, or spins. Watch the run state and end such a VM at once, so
   * the instance turns failed with the reason instead of hanging.
   */
  private watchKvm(): void {
    const check = async (): Promise<void> => {
      const qmp = this.qmp;
      if (!qmp || qmp.isClosed || this.detached || this.stopRequested) return;
      const st = (await qmp.execute('query-status').catch(() => ({}))) as { status?: string };
      if (st.status === 'internal-error' || st.status === 'guest-panicked') {
        this.failure =
          st.status === 'internal-error' ? 'KVM internal error: the hypervisor could not run the guest' : 'guest kernel panicked';
        this.proc?.kill('SIGKILL');
      }
    };
    // STOP arrives at once on an internal error; the poll is there for what sends no event.
    this.qmp?.on('event', (ev) => {
      if (ev.event === 'STOP' || ev.event === 'GUEST_PANICKED') void check();
    });
    const timer = setInterval(() => void check(), 1000);
    timer.unref();
    void this.exited.then(() => clearInterval(timer));
  }

  /** Takes over a QEMU process started by an earlier daemon (not our child: its pid is polled). */
  async adopt(proc: DetachedProcess): Promise<void> {
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    await this.connectQmp();
    const cmdline = await fs.readFile(`/proc/${proc.pid}/cmdline`, 'utf8').catch(() => '');
    if (cmdline.includes('\0-accel\0kvm\0')) this.watchKvm();
  }

  private async connectQmp(signal?: AbortSignal): Promise<void> {
    const opts = signal ? { timeoutMs: 10_000, signal } : { timeoutMs: 10_000 };
    this.qmp = await QmpClient.connect(this.p.qmp, opts);
    this.qmp.on('event', (ev) => {
      if (ev.event === 'SHUTDOWN') this.shutdownEvent = ev;
    });
  }

  detach(): void {
    this.detached = true;
    this.proc?.release();
    this.qmp?.close();
  }

  private onProcessGone({ code, signal: sig }: ProcessExit): void {
    if (this.detached) return;
    this.qmp?.close();
    // passt has gone with QEMU (--one-off); its directory may be outside the state dir.
    void Passt.cleanup(this.p.netDir);
    const reason = String(this.shutdownEvent?.data?.['reason'] ?? '');
    let exit: VmExit;
    if (this.failure) exit = { reason: 'vmm-error', detail: this.failure };
    else if (this.stopRequested) exit = { reason: 'host-stop', detail: 'stopped by the host' };
    else if (reason === 'guest-reset' || reason === 'guest-shutdown')
      exit = { reason: 'guest-poweroff', detail: `guest ended the VM (${reason})` };
    else if (reason === 'guest-panic') exit = { reason: 'guest-panic', detail: 'guest kernel panicked' };
    else if (sig) exit = { reason: 'killed', detail: `QEMU was killed by ${sig}` };
    else if (code !== null && code !== 0) exit = { reason: 'vmm-error', detail: `QEMU exited with status ${code}` };
    else exit = { reason: 'killed', detail: 'QEMU process ended without a guest shutdown' };
    this.resolveExit(exit);
  }

  async pause(): Promise<void> {
    await this.requireQmp().execute('stop');
  }

  async resume(): Promise<void> {
    await this.requireQmp().execute('cont');
  }

  connectAgent(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(this.p.agent, 'agent', signal);
  }

  connectData(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(this.p.data, 'data', signal);
  }

  private connectPort(socketPath: string, what: string, signal?: AbortSignal): Promise<Duplex> {
    return new Promise((resolve, reject) => {
      const s = net.connect(socketPath);
      const onAbort = (): void => {
        s.destroy();
        reject(new AegisError('CANCELLED', `${what} channel connect cancelled`));
      };
      signal?.addEventListener('abort', onAbort, { once: true });
      s.once('connect', () => {
        signal?.removeEventListener('abort', onAbort);
        resolve(s);
      });
      s.once('error', (err) => {
        signal?.removeEventListener('abort', onAbort);
        reject(new AegisError('UNAVAILABLE', `${what} channel of VM ${this.id}: ${err.message}`));
      });
    });
  }

  /** QMP `quit` (SIGTERM after `detach`), SIGKILL at the deadline whatever QMP does. */
  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const proc = this.proc;
    if (!proc) return;
    this.stopRequested = true;
    const qmp = this.detached ? undefined : this.qmp;
    await proc.stop({
      timeoutMs: options.timeoutMs ?? 3000,
      ...(options.signal ? { signal: options.signal } : {}),
      ...(qmp ? { ask: () => qmp.execute('quit') } : {}),
    });
    if (!this.detached) await this.exited;
  }

  /** The end of what the console ring holds (reading empties it: a tail is for reports). */
  async consoleTail(maxBytes = 4096): Promise<string> {
    try {
      const text = (await this.requireQmp().execute('ringbuf-read', {
        device: CONSOLE_RING,
        size: CONSOLE_RING_BYTES,
        format: 'utf8',
      })) as string;
      return typeof text === 'string' ? text.slice(-maxBytes) : '';
    } catch {
      return '';
    }
  }

  private requireQmp(): QmpClient {
    if (!this.qmp || this.qmp.isClosed) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is not running`);
    return this.qmp;
  }
}
