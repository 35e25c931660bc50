/**
 * An instance's `-v` list as it will keep it: host directories resolved and checked (they
 * must exist, be directories, and stay clear of the daemon's own files), named volumes made
 * when missing, and every kind one the backend can attach. Checked again before a restart.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { VolumeKind } from '@aegis/vmm';
import type { DaemonConfig } from '../config.js';
import type { CreateRequest } from '../instances/spec.js';
import { checkMounts, normalTarget, type VolumeMount } from './mounts.js';
import type { VolumeService } from './service.js';

export class HostMounts {
  constructor(
    private readonly config: Pick<DaemonConfig, 'home' | 'kernelPath' | 'rootfsPath' | 'templatesDir'>,
    private readonly volumes: VolumeService,
    private readonly backendName: string,
    /** What kinds of volume the backend can attach (its probe's capabilities). */
    private readonly volumeKinds: readonly VolumeKind[],
  ) {}

  /** The request's volumes: host directories resolved, named volumes created when missing (as Docker does). */
  async prepare(requested: NonNullable<CreateRequest['volumes']>): Promise<VolumeMount[]> {
    const mounts: VolumeMount[] = requested.map((m) => ({
      type: m.type,
      source: m.source,
      target: normalTarget(m.target) ?? m.target,
      readOnly: m.readOnly === true,
    }));
    checkMounts(mounts);
    for (const m of mounts) this.requireKind(m);
    for (const m of mounts) {
      if (m.type === 'bind') m.source = await this.hostDirectory(m.source);
      else await this.volumes.ensure(m.source);
    }
    return mounts;
  }

  /** Before a restart: the instance's host directories must still be there, and still directories. */
  async recheck(mounts: readonly VolumeMount[]): Promise<void> {
    for (const m of mounts) {
      this.requireKind(m);
      if (m.type === 'bind' && (await this.hostDirectory(m.source)) !== m.source) {
        throw new AegisError('FAILED_PRECONDITION', `host path ${m.source} is now a symlink; it was shared as a directory`);
      }
    }
  }

  private requireKind(m: VolumeMount): void {
    if (this.volumeKinds.includes(m.type === 'bind' ? 'share' : 'disk')) return;
    throw new AegisError(
      'UNSUPPORTED',
      m.type === 'bind'
        ? `the ${this.backendName} backend cannot share a host directory (${m.source}); use a named volume`
        : `the ${this.backendName} backend cannot attach named volumes`,
    );
  }

  /**
   * A host directory to share: it must exist and be a directory (9p exports directories),
   * symlinks resolved now, and it must not overlap what a guest must never reach: AEGIS_HOME
   * (registry, secrets key, VM disks), the guest kernel and rootfs every VM boots, and the
   * snapshot templates every clone maps.
   */
  private async hostDirectory(given: string): Promise<string> {
    let real: string;
    try {
      real = await fs.realpath(given);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT') throw new AegisError('NOT_FOUND', `host path ${given} does not exist`);
      throw new AegisError('INVALID_ARGUMENT', `host path ${given}: ${code ?? (err as Error).message}`);
    }
    if (!(await fs.stat(real)).isDirectory()) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `host path ${given} is not a directory: only directories can be shared (copy a file in with aegis cp)`,
      );
    }
    const resolved = (p: string): Promise<string> => fs.realpath(p).catch(() => path.resolve(p));
    const rootfs = await resolved(this.config.rootfsPath);
    const protectedDirs: [string, string][] = [
      ['AEGIS_HOME', await resolved(this.config.home)],
      ['the guest kernel', path.dirname(await resolved(this.config.kernelPath))],
      ['the guest rootfs', path.dirname(rootfs)],
      ['the snapshot templates', await resolved(this.config.templatesDir ?? path.join(path.dirname(path.dirname(rootfs)), 'templates'))],
    ];
    const inside = (a: string, b: string): boolean => a === b || a.startsWith(b.endsWith('/') ? b : `${b}/`);
    for (const [what, dir] of protectedDirs) {
      if (inside(real, dir) || inside(dir, real)) {
        throw new AegisError(
          'INVALID_ARGUMENT',
          `host path ${given} overlaps ${what} (${dir}): the daemon's own files are never shared with guests`,
        );
      }
    }
    return real;
  }
}
