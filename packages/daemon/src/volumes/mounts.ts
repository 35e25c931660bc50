/**
 * An instance's volumes (docker -v): what may be asked for, and who may attach a named volume
 * when. Pure rules, no I/O; the service (service.ts) and the lifecycle apply them.
 */
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';

/**
 * A volume of an instance (the API's VolumeMount): a host directory (`bind`, its symlinks
 * resolved when the instance was created) or a named volume (`volume`). `readOnly` is always
 * said once a request has been read, so nothing downstream guesses its default.
 */
export type VolumeMount = Required<ApiSchemas['VolumeMount']>;

/** Docker's rule for a local volume name, capped at 64 characters (it is a file name of ours). */
export const VOLUME_NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;

/**
 * Guest paths a volume may not cover: the root itself, the kernel's file systems, and /aegis,
 * where aegis-init, the harness and the image root live.
 */
const RESERVED_TARGETS = ['/proc', '/sys', '/dev', '/aegis'];

/** The request's mount list, checked: targets absolute, plain, unique, not reserved; names valid. */
export function checkMounts(mounts: readonly VolumeMount[]): void {
  const seen = new Set<string>();
  for (const [i, m] of mounts.entries()) {
    const where = `volumes.${i}`;
    if (m.type === 'volume' && !VOLUME_NAME.test(m.source)) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `invalid request: ${where}.source ${JSON.stringify(m.source.slice(0, 80))} is not a volume name ([A-Za-z0-9][A-Za-z0-9_.-], at most 64); a host directory must be an absolute path`,
      );
    }
    if (m.type === 'bind' && !path.isAbsolute(m.source)) {
      throw new AegisError('INVALID_ARGUMENT', `invalid request: ${where}.source must be an absolute host path`);
    }
    const t = normalTarget(m.target);
    if (t === undefined) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `invalid request: ${where}.target must be an absolute guest path without "." or ".." components`,
      );
    }
    if (t === '/' || RESERVED_TARGETS.some((r) => t === r || t.startsWith(`${r}/`))) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `invalid request: ${where}.target ${t} is reserved (/, /proc, /sys, /dev and /aegis cannot be covered)`,
      );
    }
    if (seen.has(t)) throw new AegisError('INVALID_ARGUMENT', `invalid request: ${where}.target ${t} is given twice`);
    seen.add(t);
  }
}

/** `/a/b/` → `/a/b`; undefined for a relative path or one with `.`/`..`/empty components. */
export function normalTarget(target: string): string | undefined {
  if (!target.startsWith('/')) return undefined;
  const parts = target.split('/').slice(1);
  while (parts.length > 1 && parts[parts.length - 1] === '') parts.pop();
  if (parts.length === 1 && parts[0] === '') return '/';
  if (parts.some((p) => p === '' || p === '.' || p === '..')) return undefined;
  return `/${parts.join('/')}`;
}

/** Mount order: a parent before what is mounted inside it (`/work` before `/work/cache`), as Docker sorts. */
export function mountOrder(mounts: readonly VolumeMount[]): VolumeMount[] {
  const depth = (m: VolumeMount): number => m.target.split('/').length;
  return [...mounts].sort((a, b) => depth(a) - depth(b));
}

/** An instance that has a named volume attached now (its VM runs, or is being started). */
export interface Attachment {
  handle: string;
  readOnly: boolean;
}

/**
 * Why `name` cannot be attached (`readOnly` or not) beside the instances that have it now, or
 * undefined when it can. One writer and nobody else, or any number of readers: ext4 has no
 * notion of a second kernel, so a VM reading a file system another VM writes sees stale
 * metadata (and a read-only mount of a dirty journal cannot even start). A VMM's image locks
 * refuse the same thing; this says it first, and says who holds it.
 */
export function attachConflict(name: string, readOnly: boolean, holders: readonly Attachment[]): string | undefined {
  const writer = holders.find((h) => !h.readOnly);
  if (writer) {
    return `volume "${name}" is attached read-write to instance "${writer.handle}"; a volume has one writer and no other user at a time (stop that instance first)`;
  }
  if (!readOnly && holders.length > 0) {
    const names = holders.map((h) => `"${h.handle}"`).join(', ');
    return `volume "${name}" is attached read-only to ${names}; it can be written only when no other instance has it (stop them, or attach it with :ro)`;
  }
  return undefined;
}
