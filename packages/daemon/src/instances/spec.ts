/**
 * What an instance is asked to be and how it is shown: request and view types, and the pure
 * rules (Docker's Entrypoint/Cmd, an image's Env) the lifecycle applies. No I/O but reading a
 * disk's name.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { InstanceRow } from '../registry/db.js';
import type { ImageConfig } from '../images/manifest.js';
import { isUp, type InstanceState } from './state.js';
import { isIdlePaused } from './idle.js';
import { isScratchDisk, SCRATCH_DISK } from './disks.js';

/** POST /v1/instances and /v1/run, as spec/openapi.json has it (validated against it at the edge). */
export type CreateRequest = ApiSchemas['CreateInstanceRequest'];
export type ExecRequest = ApiSchemas['ExecRequest'];
/** What an exec emits; the `error` event is the server's, written when a stream fails. */
export type ExecEvent = Exclude<ApiSchemas['ExecEvent'], { type: 'error' }>;
/** An instance as the API shows it. */
export type InstanceView = ApiSchemas['Instance'];

// The state union is written in state.ts (with its transitions) and in the spec: a compile
// error here when the two lists disagree.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
type Holds<T extends true> = T;
export type StatesMatchSpec = Holds<Same<InstanceState, ApiSchemas['InstanceState']>>;

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

/** Whose identity the guest holds: secret placeholders and the egress CA (a fork's are its origin's). */
export function identityOf(row: InstanceRow): string {
  return row.spec.identityOf ?? row.id;
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
  if (row.spec.deadlineAtMs !== undefined && isUp(row.state)) view.deadline = new Date(row.spec.deadlineAtMs).toISOString();
  if (row.spec.idlePauseMs) view.idlePauseMs = row.spec.idlePauseMs;
  if (row.spec.idleHibernateMs) view.idleHibernateMs = row.spec.idleHibernateMs;
  if (row.spec.egress) view.egress = row.spec.egress;
  if (isIdlePaused(row)) view.idlePaused = true;
  return view;
}
