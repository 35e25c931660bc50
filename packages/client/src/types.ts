/** Types of the daemon API (spec/openapi.json is the contract; these mirror it). */
export type InstanceState = 'starting' | 'running' | 'paused' | 'stopping' | 'stopped' | 'failed';

export interface Instance {
  id: string;
  handle: string;
  state: InstanceState;
  command: string[];
  createdAt: string;
  startedAt?: string;
  stoppedAt?: string;
  exitCode: number | null;
  stateReason?: string;
  memoryMiB: number;
  vcpuCount: number;
  backend?: string;
  ports: PortMapping[];
  network: NetworkMode;
  image?: string;
  imageDigest?: string;
  workdir?: string;
  user?: string;
  labels?: Record<string, string>;
  /** When it will be stopped (its timeoutMs), ISO 8601. */
  deadline?: string;
}

export interface Image {
  digest: string;
  references: string[];
  sizeBytes: number;
  fsBytes: number;
  storedAt: string;
  created?: string;
  architecture: string;
}

export type PullEvent =
  | { type: 'resolved'; reference: string }
  | { type: 'progress'; digest: string; phase: 'layer' | 'config' | 'manifest'; doneBytes: number; totalBytes: number }
  | { type: 'preparing'; digest: string }
  | { type: 'done'; image: Image; cached: boolean };

/** `user`: outbound network, host loopback unreachable. `none`: no network device. */
export type NetworkMode = 'user' | 'none';

export interface PortMapping {
  guestPort: number;
  hostPort: number;
  hostIp: string;
  protocol: 'tcp';
}

export interface CreateInstanceRequest {
  /** With `image`: replaces its Cmd and may be omitted. */
  command?: string[];
  image?: string;
  handle?: string;
  env?: Record<string, string>;
  /** Secret names for the workload's environment; `*` for all. */
  secrets?: string[];
  /**
   * Delete the instance if it fails to start or the caller goes away first; under `run()`
   * also when it ends or that stream is dropped.
   */
  autoRemove?: boolean;
  /** Host ports forwarded into the guest (hostPort 0 or absent: a free one). */
  exposes?: { guestPort: number; hostPort?: number; hostIp?: string; protocol?: 'tcp' }[];
  workdir?: string;
  memoryMiB?: number;
  vcpuCount?: number;
  network?: NetworkMode;
  /** `name`, `uid`, `name:group`, `uid:gid` (Docker's --user). */
  user?: string;
  /** Keep the workload's stdin open for `instanceInput` (docker run -i). */
  stdin?: boolean;
  /** Run the workload on a pseudo-terminal of this size (docker run -t). */
  tty?: { rows: number; cols: number };
  /** Key/value tags for finding and filtering it (docker --label). */
  labels?: Record<string, string>;
  /** Stopped (and with autoRemove deleted) this long after creation; 0: none; default the daemon's. */
  timeoutMs?: number;
}

export interface ExecRequest {
  command: string[];
  env?: Record<string, string>;
  workdir?: string;
  user?: string;
  stdin?: boolean;
  /** Run on a pseudo-terminal of this size. */
  tty?: { rows: number; cols: number };
}

export interface Status {
  version: string;
  pid: number;
  uptimeMs: number;
  home: string;
  backend: { name: string; detail: string; acceleration: string; accelerationReason: string };
  /** How late aegisd's event loop ran over the last 10–20 s. */
  eventLoopDelayMs: { p50Ms: number; p99Ms: number; maxMs: number; windowMs: number };
  instances: { total: number; running: number };
}

export type Stream = 'stdout' | 'stderr';

export type ExecEvent =
  | { type: 'started'; execId: string }
  | { type: 'output'; stream: Stream; data: string }
  /** guestDurationMs: the harness's own time from receiving the exec to the exit. */
  | { type: 'exit'; exitCode: number | null; signal: string | null; guestDurationMs?: number };

export type LogEvent =
  | { type: 'output'; stream: Stream; data: string; timeMs: number; execId?: string }
  | { type: 'end'; state: InstanceState; exitCode: number | null; stateReason?: string };

export type RunEvent = { type: 'created'; instance: Instance } | LogEvent;

export interface WaitResult {
  state: InstanceState;
  exitCode: number | null;
  stateReason?: string;
}

export interface InstanceStats {
  id: string;
  handle: string;
  state: InstanceState;
  cpuPercent: number | null;
  vmmMemoryBytes: number | null;
  memoryLimitBytes: number;
  guestMemoryUsedBytes: number | null;
  guestMemoryTotalBytes: number | null;
  processes: number | null;
  diskUsedBytes: number | null;
}

export interface ProcessInfo {
  pid: number;
  ppid: number;
  uid: number;
  state: string;
  rssKiB: number;
  cpuMs: number;
  startedAfterBootMs: number;
  command: string;
}

/** What is at a guest path (files API). */
export interface FileStat {
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'other';
  size: number;
  /** Permission bits with setuid/setgid/sticky. */
  mode: number;
  uid: number;
  gid: number;
  mtimeMs: number;
  linkTarget?: string;
}

export interface SecretMeta {
  name: string;
  createdAt: string;
  updatedAt: string;
}
