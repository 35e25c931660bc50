/**
 * The VMM interface: everything the daemon may ask of a hypervisor backend. It is kept small
 * on purpose and must fit QEMU, Firecracker and libkrun unchanged; docs/backends.md is its
 * contract in MUST/SHOULD language. Differences between backends are data (`capabilities`),
 * never `instanceof` checks. An operation a backend lacks fails with UNSUPPORTED.
 */
import type { Duplex } from 'node:stream';
import type { StrayProcess } from './process.js';

/** `qemu`, `firecracker`, or whatever name a registered backend has (`AEGIS_BACKEND` picks by it). */
export type BackendName = string;

export interface Capabilities {
  /** Guest execution can be frozen and continued (QMP stop/cont, PATCH /vm, SIGSTOP). */
  pause: boolean;
  /** Memory and device state can be saved (`Vm.saveSnapshot`) and restored (`VmConfig.restoreFrom`). */
  snapshot: boolean;
  /** The VM keeps running when the daemon exits, and `attach` finds it again. */
  survivesDaemonRestart: boolean;
  /** How the agent channel is carried to the guest. */
  agentTransport: 'virtio-serial' | 'vsock';
  /** Acceleration in use: hardware, or software emulation. */
  acceleration: 'kvm' | 'hvf' | 'tcg';
  /**
   * Network modes the backend can give a guest. `user`: outbound TCP/UDP and DNS through a
   * user-mode stack (no root, TAP or firewall rules on the host) that never maps the host's
   * loopback into the guest. `none`: no network device at all.
   */
  networkModes: NetworkMode[];
  /**
   * `Backend.cloneDisk` makes copy-on-write children of a disk, in the backend's own format,
   * which a VM can then boot on (`scratchDiskCloned`): how warm-boot clones share their
   * template's disk. Without it (or without `snapshot`) the daemon boots every VM cold.
   */
  diskClones: boolean;
  /** The kinds of `VmConfig.volumes` the backend can attach; any other is UNSUPPORTED. */
  volumeKinds: VolumeKind[];
  /**
   * The CPU its guests see, model and features (e.g. QEMU's `max,erms=off` under TCG,
   * `host:<fingerprint>` under KVM): a saved machine (template, checkpoint, hibernation) is
   * restored only where this is the same, since a guest keeps using the features it found.
   */
  cpu: string;
}

export type NetworkMode = 'user' | 'none';

/**
 * `disk`: a file holding an ext4 file system (a named volume), attached as one more virtio
 * block device; the host never mounts it. `share`: a host directory, served to the guest by
 * the VMM (QEMU: 9p, `security_model=mapped-xattr`), confined to that directory.
 */
export type VolumeKind = 'disk' | 'share';

/** A volume aegis-init mounts before the harness starts. */
export interface VmVolume {
  kind: VolumeKind;
  /** The disk image file, or the shared directory; absolute, symlinks already resolved. */
  hostPath: string;
  /**
   * Where the guest mounts it: an absolute path in the workload's root (with an image, inside
   * the image's root). Created when missing.
   */
  guestPath: string;
  /** Enforced by the VMM (a read-only drive, a read-only export), not only by the mount. */
  readOnly: boolean;
}

export interface Probe {
  available: boolean;
  /** Why not, or what was found (binary, version, accelerator), in one line. */
  detail: string;
  capabilities?: Capabilities;
  /** Which accelerator VMs get and why, in one line ("/dev/kvm present but …; using TCG"). */
  accelerationReason?: string;
  /** The VMM's own version line, when it runs (part of what keys snapshots and verdicts). */
  version?: string;
  /**
   * Present while part of the answer is still being worked out in the background (KVM being
   * tested by a boot): resolves with the final probe. Until then the probe above holds (a
   * backend answers with what is sure to work, e.g. TCG), so nothing waits on the test.
   */
  settled?: Promise<Probe>;
}

export interface VmConfig {
  /** Unique per VM; used in process titles and file names. */
  id: string;
  /** A directory the backend owns for this VM's sockets, pid and logs; created by the caller. */
  stateDir: string;
  kernelPath: string;
  /** Shared by every VM, attached read-only. */
  rootfsPath: string;
  /** This VM's own writable disk (the upper layer over the rootfs). */
  scratchDiskPath: string;
  /**
   * An OCI image's prepared filesystem, attached read-only as the third disk; aegis-init
   * mounts it under this VM's own layer (on the scratch disk) as the workload's root.
   */
  imageDiskPath?: string;
  /**
   * The scratch disk was made by this backend's `Backend.cloneDisk` (a copy-on-write child, in
   * the backend's own format). Default: a raw disk image. Never guessed from the file: a raw
   * disk the guest wrote could look like any format's header.
   */
  scratchDiskCloned?: boolean;
  /**
   * Where the guest RAM of a snapshot lives. `write`: this VM's `saveSnapshot` puts its RAM in
   * this file (a backend may keep RAM there from boot, as QEMU does, so that saving writes
   * device state only). `map`: with `restoreFrom`, RAM is mapped copy-on-write from this file
   * (pages read on demand, shared between clones until written, never copied whole) and the
   * file is never written.
   */
  snapshotMemory?: { path: string; access: 'write' | 'map' };
  /**
   * Resume from a snapshot written by `Vm.saveSnapshot` instead of booting. Every other field
   * must describe the same machine the snapshot was taken of (the scratch disk may be a
   * `cloneDisk` child of that machine's, and its volumes the same devices in the same order).
   * UNSUPPORTED where `capabilities.snapshot` is false.
   */
  restoreFrom?: string;
  memoryMiB: number;
  vcpuCount: number;
  /**
   * `user`: the backend attaches a network device and tells the guest its static addressing
   * with `aegis_net=ADDR/PREFIX,GATEWAY,DNS` on the kernel command line. `none`: no device.
   * UNSUPPORTED when the mode is not in `capabilities.networkModes`.
   */
  network: NetworkMode;
  /** Extra kernel command-line words (the backend adds its own). */
  kernelArgs: string[];
  /**
   * Volumes to attach, in order. The backend attaches each (kinds in
   * `capabilities.volumeKinds`, else UNSUPPORTED) and tells the guest where to mount it with
   * `aegis_volN=` words on the kernel command line (`volumeKernelArgs`). A machine restored
   * from a snapshot has exactly the volumes it was saved with (it cannot gain devices).
   */
  volumes?: VmVolume[];
}

/** What the daemon stores to find a running VM again after it restarts. Opaque to the daemon. */
export type VmRecord = Record<string, unknown>;

export type VmExitReason = 'guest-poweroff' | 'guest-panic' | 'host-stop' | 'killed' | 'vmm-error';

export interface VmExit {
  reason: VmExitReason;
  /** Human detail (signal, VMM message); never contains workload data. */
  detail: string;
}

export interface Vm {
  readonly id: string;
  /** Stable data to persist; passing it to `Backend.attach` yields this VM again. */
  record(): VmRecord;
  /** Boots the VM. Resolves once the VMM runs the guest (not when the guest is ready). */
  start(signal?: AbortSignal): Promise<void>;
  /** Freezes guest execution. UNSUPPORTED where `capabilities.pause` is false. */
  pause(signal?: AbortSignal): Promise<void>;
  resume(signal?: AbortSignal): Promise<void>;
  /**
   * Opens the agent channel: a byte stream to the harness. May be called again after the
   * stream closes (for example after a daemon restart); the guest keeps its state.
   */
  connectAgent(signal?: AbortSignal): Promise<Duplex>;
  /**
   * Opens the data channel: a second byte stream to the guest, where aegis-init splices
   * forwarded TCP connections (--expose) in binary frames (spec/guest-rpc.md, "Data channel").
   * Same reconnect rules as the agent channel.
   */
  connectData(signal?: AbortSignal): Promise<Duplex>;
  /**
   * Pauses the VM and writes its device state to `file` and its RAM as `snapshotMemory` says
   * (the VM stays paused; the caller usually stops it next). Disks are not copied: they must be
   * kept as they are. Present only where `capabilities.snapshot` is true.
   */
  saveSnapshot?(file: string, signal?: AbortSignal): Promise<void>;
  /** Ends the VMM process: graceful where the VMM has a way, then forced after `timeoutMs`. */
  stop(options?: { timeoutMs?: number; signal?: AbortSignal }): Promise<void>;
  /**
   * Lets go of the VM without stopping it (the daemon is exiting; `Backend.attach` takes it
   * over later). After this, `exited` never resolves through this object.
   */
  detach(): void;
  /** Resolves once, when the VMM process has gone, for any reason. */
  readonly exited: Promise<VmExit>;
  /** A short tail of the serial console, for error reports. Never secret-bearing by design. */
  consoleTail(maxBytes?: number): Promise<string>;
  /** The VMM's host process, for resource accounting (`aegis stats`); undefined before it starts. */
  hostPid(): number | undefined;
}

export interface Backend {
  readonly name: BackendName;
  probe(): Promise<Probe>;
  /** Prepares a VM without booting it. */
  create(config: VmConfig, signal?: AbortSignal): Promise<Vm>;
  /** Finds a VM started by an earlier daemon; NOT_FOUND when its process has gone. */
  attach(record: VmRecord, signal?: AbortSignal): Promise<Vm>;
  /**
   * Makes `file` a copy-on-write child of the disk image `base` (which must then never change
   * while the child exists), for a VM started with `scratchDiskCloned`. Present only where
   * `capabilities.diskClones` is true.
   */
  cloneDisk?(base: string, file: string, signal?: AbortSignal): Promise<void>;
  /**
   * Writes a standalone raw, sparse copy of a VM's disk to `dest` (a `cloneDisk` child included,
   * its base's blocks read through): what a checkpoint keeps, so that it depends on nothing else.
   * The disk must not change meanwhile (its VM paused or stopped). Present where
   * `capabilities.snapshot` is true.
   */
  copyDisk?(source: string, sourceCloned: boolean, dest: string, signal?: AbortSignal): Promise<void>;
  /**
   * The processes this backend started (VMMs and their helpers) for VMs whose state directory
   * is under `dir`, except the VMs of the records in `keep` and their helpers: what a restarted
   * daemon ends (a start whose record was never written, a pooled VM, a half-built template).
   * Records of another backend are ignored.
   */
  strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]>;
}
