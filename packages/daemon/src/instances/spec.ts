/**
 * What an instance is asked to be and how it is shown: request and view types, and the pure
 * rules (Docker's Entrypoint/Cmd, an image's Env) the lifecycle applies. No I/O but reading a
 * disk's name.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError, type Stream } from '@aegis/protocol';
import type { NetworkMode } from '@aegis/vmm';
import type { InstanceRow } from '../registry/db.js';
import type { PortMapping } from '../ports/forwarder.js';
import type { ImageConfig } from '../images/registry.js';
import { isLive, type InstanceState } from './state.js';
import { isIdlePaused } from './idle.js';
import type { VolumeMount } from '../volumes/mounts.js';
import { isScratchDisk, SCRATCH_DISK } from './disks.js';

export interface CreateRequest {
  /** With an image: replaces its Cmd (its Entrypoint stays); may then be omitted. */
  command?: string[];
  /** An OCI image reference or digest; pulled first when this host does not have it. */
  image?: string;
  handle?: string;
  env?: Record<string, string>;
  /** Secret names for the workload's environment; `*` for all. */
  secrets?: string[];
  /**
   * Delete the instance if it fails to start, or if the caller goes away before it started
   * (`aegis run`); under POST /v1/run also when it ends or that request is dropped.
   */
  autoRemove?: boolean;
  /** Ports to forward from the host into the guest. */
  exposes?: { guestPort: number; hostPort?: number; hostIp?: string; protocol?: 'tcp' }[];
  workdir?: string;
  memoryMiB?: number;
  vcpuCount?: number;
  network?: NetworkMode;
  /** Docker's --user: `name`, `uid`, `name:group`, `uid:gid`; default the image's User, else root. */
  user?: string;
  /** Keep the workload's stdin open for `input` (docker run -i). */
  stdin?: boolean;
  /** Run the workload on a pseudo-terminal of this size (docker run -t). */
  tty?: { rows: number; cols: number };
  labels?: Record<string, string>;
  /** Stopped (and with autoRemove deleted) this long after it is created; 0: never. Default: the daemon's. */
  timeoutMs?: number;
  /** Host directories (`bind`, an absolute host path) and named volumes (`volume`, made when missing). */
  volumes?: { type: 'bind' | 'volume'; source: string; target: string; readOnly?: boolean }[];
  /** Paused after this long unused, woken by the next use; 0: never. Default: the daemon's (AEGIS_IDLE_PAUSE). */
  idlePauseMs?: number;
}

export interface ExecRequest {
  command: string[];
  env?: Record<string, string>;
  workdir?: string;
  user?: string;
  /** Keep the command's stdin open for `execInput` (otherwise it reads /dev/null). */
  stdin?: boolean;
  /** Run on a pseudo-terminal of this size (stdin is then always open). */
  tty?: { rows: number; cols: number };
}

export type ExecEvent =
  | { type: 'started'; execId: string }
  | { type: 'output'; stream: Stream; data: string }
  | {
      type: 'exit';
      exitCode: number | null;
      signal: string | null;
      guestDurationMs?: number;
      /** A background process kept the command's pipes open: output after the grace was cut. */
      truncated?: boolean;
    };

export interface InstanceView {
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
  backend: string;
  ports: PortMapping[];
  network: NetworkMode;
  /** The image's reference (or digest when it has none); absent for the base rootfs. */
  image?: string;
  imageDigest?: string;
  workdir?: string;
  user?: string;
  labels?: Record<string, string>;
  /** When it will be stopped (its --timeout), ISO 8601. */
  deadline?: string;
  /** Host directories and named volumes, in mount order. */
  volumes: VolumeMount[];
  /** `--idle-pause`: paused after this long unused. */
  idlePauseMs?: number;
  /** Paused because nobody used it: the next use wakes it (a user's pause is not woken). */
  idlePaused?: boolean;
}

/**
 * The instance's kept disk in `dir`, and whether the backend made it (`cloneDisk`), if it has
 * one. Any `scratch.*` but the raw one is a clone: instances cloned before the file was called
 * `scratch.clone` keep the name their backend gave it.
 */
export async function existingDisk(dir: string): Promise<{ path: string; cloned: boolean } | undefined> {
  const names = await fs.readdir(dir).catch(() => [] as string[]);
  const clone = names.includes(SCRATCH_DISK.clone) ? SCRATCH_DISK.clone : names.find((n) => isScratchDisk(n) && n !== SCRATCH_DISK.raw);
  if (clone) return { path: path.join(dir, clone), cloned: true };
  return names.includes(SCRATCH_DISK.raw) ? { path: path.join(dir, SCRATCH_DISK.raw), cloned: false } : undefined;
}

/** Docker's rule: a given command replaces the image's Cmd; its Entrypoint stays in front. */
export function effectiveCommand(command: string[] | undefined, config: ImageConfig | undefined): string[] {
  const given = command && command.length > 0 ? command : undefined;
  const argv = config ? [...(config.entrypoint ?? []), ...(given ?? config.cmd ?? [])] : (given ?? []);
  if (argv.length === 0) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      config ? 'the image has no Entrypoint or Cmd: give a command after --' : 'a command is required',
    );
  }
  return argv;
}

export function imageEnv(config: ImageConfig | undefined): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of config?.env ?? []) {
    const i = kv.indexOf('=');
    if (i > 0) env[kv.slice(0, i)] = kv.slice(i + 1);
  }
  return env;
}

const iso = (ms: number | null): string | undefined => (ms === null ? undefined : new Date(ms).toISOString());

export function toView(row: InstanceRow): InstanceView {
  const view: InstanceView = {
    id: row.id,
    handle: row.handle,
    state: row.state,
    command: row.command,
    createdAt: new Date(row.createdAt).toISOString(),
    exitCode: row.exitCode,
    memoryMiB: row.memoryMiB,
    vcpuCount: row.vcpuCount,
    backend: row.backend,
    ports: row.ports,
    network: row.network,
    volumes: row.volumes,
  };
  if (row.image) {
    view.image = row.image.reference ?? row.image.digest;
    view.imageDigest = row.image.digest;
  }
  const startedAt = iso(row.startedAt);
  const stoppedAt = iso(row.stoppedAt);
  if (startedAt) view.startedAt = startedAt;
  if (stoppedAt) view.stoppedAt = stoppedAt;
  if (row.stateReason) view.stateReason = row.stateReason;
  if (row.workdir) view.workdir = row.workdir;
  if (row.spec.user !== undefined) view.user = row.spec.user;
  if (row.spec.labels) view.labels = row.spec.labels;
  if (row.spec.deadlineAtMs !== undefined && isLive(row.state)) view.deadline = new Date(row.spec.deadlineAtMs).toISOString();
  if (row.spec.idlePauseMs) view.idlePauseMs = row.spec.idlePauseMs;
  if (isIdlePaused(row)) view.idlePaused = true;
  return view;
}
