/**
 * Firecracker backend: one detached `firecracker` process per VM, KVM only, configured and
 * controlled over its REST API on a unix socket (`src/api.ts`). The agent and data channels
 * are vsock ports 1024 and 1025, reached through the vsock device's host socket with
 * Firecracker's `CONNECT <port>` handshake (`src/vsock.ts`).
 *
 * Firecracker runs with its working directory set to the VM's state directory, and every path
 * it records in a snapshot (the disks, the vsock socket) is relative to it: a VM restored in
 * another state directory then finds its own disks and binds its own socket, which is what the
 * jailer's chroot achieves for Firecracker's own users.
 */
import { execFile } from 'node:child_process';
import { constants as fsc, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';
import {
  KVM_DEVICE,
  accelMode,
  fileTail,
  kvmDeviceProblem,
  verdictKey,
  DetachedProcess,
  findStrays,
  type ProcessExit,
  type ProcessIdentity,
  type SpawnFn,
  type StrayProcess,
  verdictGate,
  type AccelVerdict,
  type Backend,
  type Capabilities,
  type Probe,
  type Vm,
  type VmConfig,
  type VmExit,
  type VmRecord,
  KERNEL_CMDLINE_MAX_BYTES,
  virtioDiskName,
  volumeKernelArg,
} from '@aegis/vmm';
import { FirecrackerApi } from './api.js';
import { testBoot } from './kvm-test.js';
import { connectVsock } from './vsock.js';

const execFileP = promisify(execFile);

/** The vsock ports aegis-init listens on (docs/backends.md). */
export const AGENT_VSOCK_PORT = 1024;
export const DATA_VSOCK_PORT = 1025;
/**
 * The guest's vsock address. Only the guest sees it, and each VM has its own host socket, so
 * every VM (and every clone of a snapshot) can have the same one: 3, the first non-reserved CID.
 */
const GUEST_CID = 3;

const BINARY = 'firecracker';
const INSTALL_HINT =
  'download a release binary from github.com/firecracker-microvm/firecracker/releases and put it on PATH or set AEGIS_FIRECRACKER';

/** Firecracker's own rule for `--id` (it refuses to start otherwise). */
const ID_PATTERN = /^[A-Za-z0-9-]{1,64}$/;

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
 * The bound on firecracker.log while a daemon is attached. It is Firecracker's stdout, and so
 * the guest's serial console: a guest printing to /dev/console grows it at whatever rate it
 * likes (QEMU's console measured 0.5-0.7 MB/s, ~2 GB an hour, before it got a ring). Past
 * CONSOLE_MAX_BYTES, checked every CONSOLE_CHECK_MS, the file is cut back to its last
 * CONSOLE_KEEP_BYTES (`trimConsoleLog`), as the QEMU backend keeps its console in a 1 MiB ring.
 */
export const CONSOLE_MAX_BYTES = 1 << 20;
export const CONSOLE_KEEP_BYTES = 256 << 10;
const CONSOLE_CHECK_MS = 1000;

/** Snapshots write or map all of guest RAM; 10 s is not enough for a large guest on a slow disk. */
const SNAPSHOT_TIMEOUT_MS = 300_000;

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

function capabilities(): Capabilities {
  return {
    pause: true,
    snapshot: true,
    survivesDaemonRestart: true,
    agentTransport: 'vsock',
    acceleration: 'kvm',
    // passt cannot drive the TAP device Firecracker needs without root (docs/backends.md).
    networkModes: ['none'],
    // Firecracker's block devices are raw files only: no copy-on-write children.
    diskClones: false,
    // Extra drives, yes; it has no 9p or virtio-fs device to share a host directory with.
    volumeKinds: ['disk'],
  };
}

interface FirecrackerRecord extends ProcessIdentity {
  backend: 'firecracker';
  id: string;
  stateDir: string;
  /** The file a later `saveSnapshot` writes RAM to (`snapshotMemory` with `write`), when the VM has one. */
  memoryFile?: string;
}

function parseRecord(record: VmRecord): FirecrackerRecord | undefined {
  const r = record as Partial<FirecrackerRecord>;
  if (r.backend !== 'firecracker' || typeof r.pid !== 'number' || typeof r.id !== 'string' || typeof r.stateDir !== 'string') {
    return undefined;
  }
  return {
    backend: 'firecracker',
    id: r.id,
    pid: r.pid,
    stateDir: r.stateDir,
    ...(typeof r.startTicks === 'number' ? { startTicks: r.startTicks } : {}),
    ...(typeof r.memoryFile === 'string' ? { memoryFile: r.memoryFile } : {}),
  };
}

/**
 * Names inside the state directory. The disks are symlinks to the caller's files, given to
 * Firecracker by these relative names (see the top of this file).
 */
const DISK = { rootfs: 'rootfs.disk', scratch: 'scratch.disk', image: 'image.disk' } as const;
/** The state directory's name for the n-th volume's disk, like the fixed ones. */
const volumeDisk = (i: number): string => `volume${i}.disk`;
const VSOCK_NAME = 'vsock.sock';

function paths(stateDir: string): { api: string; vsock: string; log: string } {
  return {
    api: path.join(stateDir, 'fc.sock'),
    vsock: path.join(stateDir, VSOCK_NAME),
    // Firecracker's stdout and stderr: the guest's serial console and Firecracker's own log.
    log: path.join(stateDir, 'firecracker.log'),
  };
}

async function isFile(file: string): Promise<boolean> {
  try {
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await fs.access(file, fsc.X_OK);
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

/** `binary` option, else AEGIS_FIRECRACKER, else the first `firecracker` on PATH. */
async function findBinary(explicit: string | undefined): Promise<{ binary?: string; missing?: string }> {
  const given = explicit ?? process.env['AEGIS_FIRECRACKER'];
  if (given) {
    return (await isExecutable(given))
      ? { binary: given }
      : { missing: `firecracker binary ${given} is missing or not executable (${INSTALL_HINT})` };
  }
  for (const dir of (process.env['PATH'] ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, BINARY);
    if (await isExecutable(candidate)) return { binary: candidate };
  }
  return { missing: `firecracker not found (${INSTALL_HINT})` };
}

/** Why the KVM device cannot be opened, with what to do about it; undefined when it can. */
async function kvmProblem(device: string): Promise<string | undefined> {
  const problem = await kvmDeviceProblem(device);
  if (!problem) return undefined;
  const exists = await fs.stat(device).then(
    () => true,
    () => false,
  );
  const hint = ' (enable virtualization in firmware, or nested virtualization on a cloud VM; load kvm_intel or kvm_amd)';
  return `${problem}: Firecracker needs KVM${exists ? '' : hint}`;
}

export class FirecrackerBackend implements Backend {
  readonly name = 'firecracker' as const;

  constructor(private readonly options: FirecrackerOptions = {}) {}

  async probe(): Promise<Probe> {
    try {
      const missing: string[] = [];
      if (process.arch !== 'x64' && process.arch !== 'arm64') missing.push(`Firecracker does not run on ${process.arch}`);
      const found = await findBinary(this.options.binary);
      if (found.missing) missing.push(found.missing);
      const device = this.options.kvmDevice ?? KVM_DEVICE;
      const kvm = await kvmProblem(device);
      if (kvm) missing.push(kvm);
      if (missing.length > 0 || !found.binary) return { available: false, detail: missing.join('; ') };
      let version: string;
      try {
        // Firecracker prints the version, then (v1.x) a log line about exiting: keep the first.
        const { stdout } = await execFileP(found.binary, ['--version'], { timeout: 10_000 });
        version = stdout.split('\n')[0]?.trim() || found.binary;
      } catch (err) {
        return { available: false, detail: `${found.binary} does not run: ${(err as Error).message.split('\n')[0] ?? ''}` };
      }
      return await this.probeKvm(`${version} (${found.binary})`, found.binary, device);
    } catch (err) {
      return { available: false, detail: `probe failed: ${(err as Error).message}` };
    }
  }

  /**
   * Firecracker has no software fallback, so it is offered only on a KVM known to run the
   * guest: a cached verdict, else a test boot in the background (`settled`) while the answer
   * stays "not available".
   */
  private async probeKvm(found: string, binary: string, device: string): Promise<Probe> {
    const mode = accelMode();
    if (mode === 'tcg') return { available: false, detail: `${found}: AEGIS_ACCEL=tcg: Firecracker needs KVM` };
    if (mode === 'kvm') {
      return { available: true, detail: `${found}; KVM not tested (AEGIS_ACCEL=kvm); network: none only`, capabilities: capabilities() };
    }
    const { kernelPath, cacheDir } = this.options;
    const untested = `${found}; KVM could not be tested`;
    const trustIt = 'set AEGIS_ACCEL=kvm to use it untested';
    if (!kernelPath) return { available: false, detail: `${untested} (no guest kernel to boot); ${trustIt}` };
    if (!cacheDir) return { available: false, detail: `${untested} (no cache directory for the verdict); ${trustIt}` };
    if (!(await isFile(kernelPath))) return { available: false, detail: `${untested}: guest kernel ${kernelPath} is missing` };
    // The binary's path as well as its version: two installs of one version are two VMMs.
    const key = await verdictKey(found, kernelPath, device);
    const gate = verdictGate(cacheDir);
    const known = await gate.cached(this.name, key);
    if (known) return fromVerdict(found, known);
    const timeoutMs = this.options.kvmTestTimeoutMs ?? 5000;
    const settled = gate
      .decide(this.name, key, () =>
        testBoot({ binary, kernelPath, timeoutMs, ...(this.options.spawn ? { spawn: this.options.spawn } : {}) }),
      )
      .then(
        (verdict) => fromVerdict(found, verdict),
        (err: unknown): Probe => ({ available: false, detail: `${found}; KVM test could not run: ${(err as Error).message}` }),
      );
    return { available: false, detail: `${found}; KVM not tested yet (test boot running)`, settled };
  }

  async create(config: VmConfig, signal?: AbortSignal): Promise<Vm> {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'create cancelled');
    if (!ID_PATTERN.test(config.id)) {
      throw new AegisError('INVALID_ARGUMENT', `VM id ${JSON.stringify(config.id)}: Firecracker takes 1 to 64 letters, digits and dashes`);
    }
    if (config.network !== 'none') {
      throw new AegisError(
        'UNSUPPORTED',
        `the Firecracker backend has no ${config.network} networking: Firecracker needs a TAP device, which passt cannot drive without root; start with --network none, or use the QEMU backend`,
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

  async strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]> {
    const kept = keep.map(parseRecord).flatMap((r) => (r ? [{ identity: r, stateDir: r.stateDir }] : []));
    return findStrays(dir, kept, (argv) =>
      path.basename(argv[0] ?? '') === BINARY && argv.includes('--api-sock') ? { what: 'Firecracker', helper: false } : undefined,
    );
  }
}

function fromVerdict(found: string, verdict: AccelVerdict): Probe {
  if (!verdict.usable) return { available: false, detail: `${found}; KVM cannot run the guest: ${verdict.detail}` };
  return { available: true, detail: `${found}; KVM (tested: ${verdict.detail}); network: none only`, capabilities: capabilities() };
}

/**
 * Where a restore maps guest RAM from: `snapshotMemory` when given, else the file
 * `saveSnapshot` wrote next to the snapshot. Firecracker maps it privately: pages are read on
 * demand, never copied, and the guest's writes never reach the file.
 */
function restoreMemoryPath(config: VmConfig): string | undefined {
  if (!config.restoreFrom) return undefined;
  return config.snapshotMemory ? path.resolve(config.snapshotMemory.path) : `${path.resolve(config.restoreFrom)}.mem`;
}

/**
 * Where `saveSnapshot` writes guest RAM. Firecracker cannot back a running guest's RAM with a
 * file (it is anonymous memory until a snapshot writes it out), so it writes it at snapshot time
 * to the `write` file the caller named; else next to the snapshot. Never to a `map` file: other
 * clones may be mapping it.
 */
function snapshotMemoryPath(memory: VmConfig['snapshotMemory'], snapshotPath: string): string {
  return memory?.access === 'write' ? path.resolve(memory.path) : `${snapshotPath}.mem`;
}

/** Points the state directory's disk names at this VM's files (see the top of this file). */
async function linkDisks(config: VmConfig): Promise<void> {
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
function bootArgs(config: VmConfig): string[] {
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

/** A reused pid is not our VM: the process must carry this VM's `--id` and API socket. */
const isOurFirecracker =
  (id: string, stateDir: string) =>
  (args: string[]): boolean => {
    const after = (flag: string): string | undefined => {
      const i = args.indexOf(flag);
      return i >= 0 ? args[i + 1] : undefined;
    };
    return after('--id') === id && after('--api-sock') === paths(stateDir).api;
  };

/**
 * Cuts a console log longer than `maxBytes` back to its last `keepBytes` (from the first whole
 * line in them): reads the tail, truncates the file to 0 and writes the tail back. Returns
 * whether it cut. Safe only because Firecracker's stdout is this file opened O_APPEND (`start`
 * opens it with 'a', as every aegisd has): its next write lands at the new end, not at its old
 * offset past a hole. We write the tail back through O_APPEND too, so whatever Firecracker wrote
 * since the truncation stays (just before the tail, out of order) instead of being overwritten.
 * Bytes written between our last read and the truncation, microseconds, are lost: it is a
 * console, kept for error reports. A file that is missing or unreadable is left alone.
 */
export async function trimConsoleLog(file: string, maxBytes = CONSOLE_MAX_BYTES, keepBytes = CONSOLE_KEEP_BYTES): Promise<boolean> {
  let fh: FileHandle;
  try {
    // No O_CREAT: a log that has gone (its state directory removed) is not made again.
    fh = await fs.open(file, fsc.O_RDWR | fsc.O_APPEND);
  } catch {
    return false;
  }
  try {
    const { size } = await fh.stat();
    if (size <= maxBytes) return false;
    // From keepBytes before the end to the end as it is now: the guest may still be writing.
    const chunks: Buffer[] = [];
    let pos = size - keepBytes;
    let total = 0;
    while (total < maxBytes) {
      const buf = Buffer.alloc(64 << 10);
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      chunks.push(buf.subarray(0, bytesRead));
      pos += bytesRead;
      total += bytesRead;
    }
    await fh.truncate(0);
    let tail = Buffer.concat(chunks);
    // Start at a whole line (and so not inside a UTF-8 sequence) when there is one.
    const nl = tail.indexOf(0x0a);
    if (nl >= 0 && nl < tail.length - 1) tail = tail.subarray(nl + 1);
    await fh.write(tail);
    return true;
  } catch {
    return false;
  } finally {
    await fh.close().catch(() => undefined);
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

interface Launch {
  binary: string;
  spawn?: SpawnVmm;
  config: VmConfig;
  connectTimeoutMs: number;
}

class FirecrackerVm implements Vm {
  readonly exited: Promise<VmExit>;
  private resolveExit!: (e: VmExit) => void;
  private proc: DetachedProcess | undefined;
  /** Keeps firecracker.log bounded while this object is attached (`watchConsole`). */
  private consoleWatch: NodeJS.Timeout | undefined;
  private trimming = false;
  private started = false;
  private gone = false;
  private stopRequested = false;
  private detached = false;
  private readonly api: FirecrackerApi;
  private readonly p: ReturnType<typeof paths>;
  private readonly connectTimeoutMs: number;
  private readonly snapshotMemory: VmConfig['snapshotMemory'];

  constructor(
    readonly id: string,
    private readonly stateDir: string,
    private readonly launch: Launch | undefined,
    adopted?: { connectTimeoutMs: number; snapshotMemory: VmConfig['snapshotMemory'] },
  ) {
    this.p = paths(stateDir);
    this.api = new FirecrackerApi(this.p.api);
    this.connectTimeoutMs = launch?.connectTimeoutMs ?? adopted?.connectTimeoutMs ?? 60_000;
    this.snapshotMemory = launch ? launch.config.snapshotMemory : adopted?.snapshotMemory;
    this.exited = new Promise((resolve) => (this.resolveExit = resolve));
  }

  hostPid(): number | undefined {
    return this.proc?.pid;
  }

  record(): VmRecord {
    if (!this.proc) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const r: FirecrackerRecord = {
      backend: 'firecracker',
      id: this.id,
      ...this.proc.identity(),
      stateDir: this.stateDir,
      ...(this.snapshotMemory?.access === 'write' ? { memoryFile: this.snapshotMemory.path } : {}),
    };
    return { ...r };
  }

  async start(signal?: AbortSignal): Promise<void> {
    if (!this.launch || this.started) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is already running`);
    if (signal?.aborted) throw new AegisError('CANCELLED', `start of VM ${this.id} cancelled`);
    this.started = true;
    const { binary, config } = this.launch;
    // Left behind by an earlier run in this directory (SIGKILL leaves them): Firecracker
    // refuses to bind over an existing API socket, and a restored vsock device the same.
    await fs.rm(this.p.api, { force: true });
    await fs.rm(this.p.vsock, { force: true });
    // The supervisor opens the log O_APPEND, which is what makes `trimConsoleLog` safe: after
    // we truncate the file, Firecracker's writes go to its new end.
    const proc = await DetachedProcess.spawn(binary, ['--api-sock', this.p.api, '--id', this.id], {
      logFile: this.p.log,
      cwd: this.stateDir,
      what: 'Firecracker',
      ...(this.launch.spawn ? { spawn: this.launch.spawn } : {}),
    });
    this.proc = proc;
    void proc.exited.then((e) => this.onProcessGone(e));
    this.watchConsole();
    try {
      await this.waitForApi(signal);
      if (config.restoreFrom) {
        const load = restoreRequest(config.restoreFrom, restoreMemoryPath(config) ?? '');
        await this.api.put(load.path, load.body, { signal, timeoutMs: SNAPSHOT_TIMEOUT_MS });
      } else {
        for (const req of bootRequests(config)) await this.api.put(req.path, req.body, { signal });
        await this.api.put('/actions', { action_type: 'InstanceStart' }, { signal });
      }
    } catch (err) {
      proc.kill('SIGKILL');
      if (err instanceof AegisError && err.code === 'CANCELLED') throw err;
      // Let Firecracker's last words reach the log before we read it.
      await Promise.race([this.exited, sleep(200)]);
      const tail = await this.logTail(2048);
      const lastWords = tail.trim().split('\n').slice(-3).join(' | ');
      throw new AegisError('UNAVAILABLE', `Firecracker did not start: ${(err as Error).message}${lastWords ? ` (log: ${lastWords})` : ''}`);
    }
  }

  /** The API socket appears shortly after exec; wait until it answers. */
  private async waitForApi(signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + 10_000;
    for (;;) {
      if (signal?.aborted) throw new AegisError('CANCELLED', `start of VM ${this.id} cancelled`);
      try {
        await this.api.get('/', { timeoutMs: 1000, ...(signal ? { signal } : {}) });
        return;
      } catch (err) {
        if (err instanceof AegisError && err.code === 'CANCELLED') throw err;
        if (this.gone) throw new AegisError('UNAVAILABLE', 'Firecracker exited before its API socket answered');
        if (Date.now() > deadline) throw new AegisError('UNAVAILABLE', `API socket ${this.p.api} did not answer within 10 s`);
      }
      await sleep(5);
    }
  }

  /**
   * Takes over a Firecracker process started by an earlier daemon. It is not our child, so
   * there is no 'exit' event and no HTTP connection that stays open: the supervisor polls the pid.
   */
  adopt(proc: DetachedProcess): void {
    this.proc = proc;
    this.started = true;
    void proc.exited.then((e) => this.onProcessGone(e));
    this.watchConsole();
  }

  /**
   * Bounds firecracker.log while this object is attached (started or adopted, not detached):
   * the guest writes it, through Firecracker's stdout, as fast as it likes. Checked at once (an
   * adopted VM's log may have grown while no daemon was attached), then every second. What
   * remains: nothing watches it while no daemon is attached (between a detach and the next
   * attach, e.g. across a daemon restart), so it can grow until one attaches again; that attach
   * trims it at once.
   */
  private watchConsole(): void {
    if (this.consoleWatch || this.gone || this.detached) return;
    void this.trimConsole();
    this.consoleWatch = setInterval(() => void this.trimConsole(), CONSOLE_CHECK_MS);
    this.consoleWatch.unref();
  }

  private stopConsoleWatch(): void {
    if (this.consoleWatch) clearInterval(this.consoleWatch);
    this.consoleWatch = undefined;
  }

  private async trimConsole(): Promise<void> {
    if (this.trimming || this.gone || this.detached) return;
    this.trimming = true;
    try {
      await trimConsoleLog(this.p.log);
    } finally {
      this.trimming = false;
    }
  }

  detach(): void {
    this.detached = true;
    this.proc?.release();
    this.stopConsoleWatch();
  }

  private onProcessGone({ code, signal }: ProcessExit): void {
    if (this.gone) return;
    this.gone = true;
    this.stopConsoleWatch();
    if (this.detached) return;
    this.resolveExit(this.exitReason(code, signal));
  }

  /**
   * Why the VM ended, decided only from what the guest cannot forge: our own stop request and
   * the process's exit status or signal. Never from firecracker.log: it is also the guest's
   * serial console, where a guest can print any "Firecracker exiting ... exit_code=" line or
   * "Kernel panic" it likes. What that costs:
   * - status 0 is a guest reset (reboot=k), and a kernel panic ends in the same reset
   *   (panic=-1): the two look alike from here, so both are a guest reset;
   * - a process adopted from an earlier aegisd is not our child and its status is not ours to
   *   read, so its end is reported as such, whatever its console says.
   */
  private exitReason(code: number | null, sig: NodeJS.Signals | null): VmExit {
    if (this.stopRequested) return { reason: 'host-stop', detail: 'stopped by the host' };
    if (sig) return { reason: 'killed', detail: `Firecracker was killed by ${sig}` };
    if (code === null) {
      return { reason: 'killed', detail: 'Firecracker ended with an exit status aegisd cannot read (it was started by an earlier aegisd)' };
    }
    if (code !== 0) return { reason: 'vmm-error', detail: `Firecracker exited with status ${code}` };
    return { reason: 'guest-poweroff', detail: 'guest ended the VM (a reset: poweroff, reboot or kernel panic)' };
  }

  async pause(signal?: AbortSignal): Promise<void> {
    await this.requireApi().patch('/vm', { state: 'Paused' }, { ...(signal ? { signal } : {}) });
  }

  async resume(signal?: AbortSignal): Promise<void> {
    await this.requireApi().patch('/vm', { state: 'Resumed' }, { ...(signal ? { signal } : {}) });
  }

  /** A Full snapshot: device state to `file`, all of RAM to `snapshotMemoryPath` (see there). */
  async saveSnapshot(file: string, signal?: AbortSignal): Promise<void> {
    const api = this.requireApi();
    const opts = signal ? { signal } : {};
    await api.patch('/vm', { state: 'Paused' }, opts);
    const snapshotPath = path.resolve(file);
    const memPath = snapshotMemoryPath(this.snapshotMemory, snapshotPath);
    await api.put(
      '/snapshot/create',
      { snapshot_type: 'Full', snapshot_path: snapshotPath, mem_file_path: memPath },
      { ...opts, timeoutMs: SNAPSHOT_TIMEOUT_MS },
    );
  }

  connectAgent(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(AGENT_VSOCK_PORT, 'agent', signal);
  }

  connectData(signal?: AbortSignal): Promise<Duplex> {
    return this.connectPort(DATA_VSOCK_PORT, 'data', signal);
  }

  /**
   * Firecracker refuses a CONNECT until the guest listens on the port, which is only after it
   * has booted: keep trying while the VM runs, up to `connectTimeoutMs`.
   */
  private async connectPort(port: number, what: string, signal?: AbortSignal): Promise<Duplex> {
    if (!this.started) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} has not started`);
    const deadline = Date.now() + this.connectTimeoutMs;
    for (;;) {
      if (this.gone) throw new AegisError('UNAVAILABLE', `${what} channel of VM ${this.id}: the VM has exited`);
      try {
        return await connectVsock(this.p.vsock, port, { timeoutMs: 5000, ...(signal ? { signal } : {}) });
      } catch (err) {
        if (err instanceof AegisError && err.code === 'CANCELLED') throw new AegisError('CANCELLED', `${what} channel connect cancelled`);
        if (Date.now() > deadline) {
          throw new AegisError('UNAVAILABLE', `${what} channel of VM ${this.id}: ${(err as Error).message}`);
        }
      }
      await sleep(20);
    }
  }

  /**
   * Firecracker has no "quit": SendCtrlAltDel (x86_64 only) makes the guest kernel reset, and
   * the reset ends Firecracker; a guest without the i8042 driver, or a paused one, ignores it,
   * and SIGKILL follows after `timeoutMs`.
   */
  async stop(options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<void> {
    const proc = this.proc;
    if (!proc || this.gone) return;
    // After detach nothing watched the pid: the supervisor checks it is still this VM's first.
    this.stopRequested = true;
    const timeoutMs = options.timeoutMs ?? 3000;
    const ctrlAltDel = (): Promise<unknown> =>
      this.api.put('/actions', { action_type: 'SendCtrlAltDel' }, { timeoutMs: Math.min(timeoutMs, 1000) });
    await proc.stop({
      timeoutMs,
      // Elsewhere than x86_64 there is no graceful way: the deadline's SIGKILL ends it.
      ask: process.arch === 'x64' ? ctrlAltDel : () => undefined,
      ...(options.signal ? { signal: options.signal } : {}),
    });
    if (this.detached) this.gone = true;
    else await this.exited;
  }

  /** The end of firecracker.log; trimming keeps its last CONSOLE_KEEP_BYTES or more. */
  async consoleTail(maxBytes = 4096): Promise<string> {
    return this.logTail(maxBytes);
  }

  private logTail(maxBytes: number): Promise<string> {
    return fileTail(this.p.log, maxBytes);
  }

  private requireApi(): FirecrackerApi {
    if (!this.started || this.gone) throw new AegisError('FAILED_PRECONDITION', `VM ${this.id} is not running`);
    return this.api;
  }
}
