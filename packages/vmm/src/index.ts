export type * from './vmm.js';
export { selectBackend, type BackendChoice } from './select.js';
export { connectSocket, fileTail, hostCpuFingerprint, processAlive } from './host.js';
export {
  KVM_DEVICE,
  accelMode,
  DEFAULT_KVM_TEST_TIMEOUT_MS,
  kvmTestTimeoutMs,
  kvmDeviceProblem,
  verdictKey,
  VerdictCache,
  VerdictGate,
  VERDICT_FILE,
  verdictGate,
  type AccelMode,
  type AccelVerdict,
} from './accel.js';
export {
  decodeGuestPath,
  encodeGuestPath,
  KERNEL_CMDLINE_MAX_BYTES,
  virtioDiskName,
  volumeKernelArg,
  type GuestFsType,
} from './volumes.js';
export {
  DetachedProcess,
  findStrays,
  procArgv,
  procStat,
  type ProcessExit,
  type ProcessIdentity,
  type ProcessKind,
  type SpawnDetachedOptions,
  type SpawnFn,
  type StrayProcess,
} from './process.js';
export { GUEST_NET, PASST_BINARY, PASST_INSTALL_HINT, Passt, guestNetKernelArg, isPasst, passtAvailable, passtPaths } from './network.js';
export type { BackendEntry, BackendOptions, MissingBackend } from './registry.js';
