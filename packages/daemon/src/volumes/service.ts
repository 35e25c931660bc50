/**
 * Named volumes: one sparse ext4 file per volume under AEGIS_HOME/volumes, made with mkfs
 * (no root, no mount), attached to a VM as one more disk. The host never mounts or reads
 * them: what is inside is the guest's (untrusted) data, formatted and written by guest
 * kernels only. They outlive instances; `remove` is refused while any instance names one.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { VmVolume } from '@aegis/vmm';
import type { Logger } from '../log.js';
import type { InstanceRow, Registry, VolumeRow } from '../registry/db.js';
import { isUp } from '../instances/state.js';
import { attachConflict, mountOrder, VOLUME_NAME, type Attachment, type VolumeMount } from './mounts.js';

const execFileP = promisify(execFile);

/** What `-v NAME:/path` creates when NAME does not exist yet (sparse: costs what is written). */
export const DEFAULT_VOLUME_MIB = 1024;
/** ext4 with a journal needs a few MiB of its own; below this a volume is mostly overhead. */
export const MIN_VOLUME_MIB = 16;
export const MAX_VOLUME_MIB = 1 << 20;

/** A volume as the API shows it (`usedBy`: instances, any state, that name it; it cannot be removed while there are any). */
export type VolumeView = ApiSchemas['Volume'];

export class VolumeService {
  /** Creations in flight, so two `-v cache:…` at once make one volume. */
  private readonly creating = new Map<string, Promise<VolumeRow>>();

  constructor(
    readonly dir: string,
    private readonly registry: Registry,
    private readonly log: Logger,
  ) {}

  fileOf(name: string): string {
    return path.join(this.dir, `${name}.ext4`);
  }

  /** Removes half-made files a killed daemon left (a volume is renamed into place once formatted). */
  async cleanup(): Promise<void> {
    for (const f of await fs.readdir(this.dir).catch(() => [] as string[])) {
      if (f.includes('.tmp-')) await fs.rm(path.join(this.dir, f), { force: true });
    }
  }

  /**
   * Creates the volume, as `docker volume create`: asking again for an existing one returns
   * it, unless a different size is asked (ALREADY_EXISTS).
   */
  async create(name: string, sizeMiB?: number): Promise<{ volume: VolumeView; created: boolean }> {
    checkName(name);
    if (sizeMiB !== undefined && (!Number.isInteger(sizeMiB) || sizeMiB < MIN_VOLUME_MIB || sizeMiB > MAX_VOLUME_MIB)) {
      throw new AegisError('INVALID_ARGUMENT', `volume size must be ${MIN_VOLUME_MIB} MiB to ${MAX_VOLUME_MIB} MiB`);
    }
    // No await before `creating` is set unless one is in flight: a second caller must see it.
    const inflight = this.creating.get(name);
    const existing = this.registry.getVolume(name) ?? (inflight ? await inflight.catch(() => undefined) : undefined);
    if (existing) {
      if (sizeMiB !== undefined && sizeMiB !== existing.sizeMiB) {
        throw new AegisError(
          'ALREADY_EXISTS',
          `volume "${name}" already exists with ${existing.sizeMiB} MiB; remove it first to change its size`,
        );
      }
      return { volume: await this.view(existing), created: false };
    }
    const making = this.make(name, sizeMiB ?? DEFAULT_VOLUME_MIB);
    this.creating.set(name, making);
    try {
      return { volume: await this.view(await making), created: true };
    } finally {
      this.creating.delete(name);
    }
  }

  private async make(name: string, sizeMiB: number): Promise<VolumeRow> {
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    // Sparse, so it costs nothing yet; but a guest that fills it must find the space there, and
    // a full host disk fails every instance's writes at once. Refused up front with the figures.
    const st = await fs.statfs(this.dir);
    const freeMiB = Math.floor((st.bavail * st.bsize) / (1024 * 1024));
    if (sizeMiB > freeMiB) {
      throw new AegisError(
        'RESOURCE_EXHAUSTED',
        `volume "${name}" of ${sizeMiB} MiB would not fit: ${freeMiB} MiB free on the disk holding ${this.dir}`,
      );
    }
    const file = this.fileOf(name);
    const tmp = `${file}.tmp-${randomBytes(4).toString('hex')}`;
    try {
      const fh = await fs.open(tmp, 'wx', 0o600);
      await fh.truncate(sizeMiB * 1024 * 1024);
      await fh.close();
      // A journal, unlike the scratch disk: a volume outlives VMs that may be killed mid-write.
      // lazy_journal_init: the fresh sparse file reads as zeros already (32 MiB less on disk).
      // No reserved blocks: nothing but the guest's data lives here.
      await execFileP('mkfs.ext4', ['-F', '-q', '-m', '0', '-L', name.slice(0, 16), '-E', 'root_owner=0:0,lazy_journal_init=1', tmp], {
        timeout: 60_000,
      });
      await fs.rename(tmp, file);
    } catch (err) {
      await fs.rm(tmp, { force: true });
      throw new AegisError('UNAVAILABLE', `cannot make volume "${name}" (is e2fsprogs installed?): ${(err as Error).message}`, {
        cause: err,
      });
    }
    const row: VolumeRow = { name, sizeMiB, createdAt: Date.now() };
    this.registry.insertVolume(row);
    this.log.info(`volume ${name}: created (${sizeMiB} MiB)`);
    return row;
  }

  /** The volume, made with the default size when missing (`-v NAME:/path`, as Docker does). */
  async ensure(name: string): Promise<void> {
    await this.create(name);
  }

  async list(): Promise<VolumeView[]> {
    return Promise.all(this.registry.listVolumes().map((r) => this.view(r)));
  }

  async get(name: string): Promise<VolumeView> {
    return this.view(this.require(name));
  }

  /** Refused (FAILED_PRECONDITION) while any instance names the volume, running or not. */
  async remove(name: string): Promise<void> {
    this.require(name);
    const users = this.usersOf(name);
    if (users.length > 0) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `volume "${name}" is used by ${users.map((u) => `instance "${u.handle}" (${u.state})`).join(', ')}; delete ${users.length > 1 ? 'them' : 'it'} first`,
      );
    }
    // The row first: from here no instance can name it (create checks rows synchronously).
    this.registry.deleteVolume(name);
    await fs.rm(this.fileOf(name), { force: true });
    this.log.info(`volume ${name}: removed`);
  }

  /**
   * Throws FAILED_PRECONDITION when an instance cannot have `mounts` now: a named volume that
   * no longer exists, or one another live instance holds (`attachConflict`). Synchronous, so
   * that the caller's next registry write (the instance's row in `starting`) happens before
   * anyone else can check: two starts cannot both win.
   */
  checkAttach(mounts: readonly VolumeMount[], exceptId?: string): void {
    for (const m of mounts) {
      if (m.type !== 'volume') continue;
      if (!this.registry.getVolume(m.source)) {
        throw new AegisError(
          'FAILED_PRECONDITION',
          `volume "${m.source}" does not exist (it was removed); create it again with: aegis volume create ${m.source}`,
        );
      }
      const holders: Attachment[] = this.registry
        .listInstances()
        .filter((r) => r.id !== exceptId && isUp(r.state))
        .flatMap((r) =>
          r.volumes.filter((v) => v.type === 'volume' && v.source === m.source).map((v) => ({ handle: r.handle, readOnly: v.readOnly })),
        );
      const why = attachConflict(m.source, m.readOnly, holders);
      if (why) throw new AegisError('FAILED_PRECONDITION', why);
    }
  }

  /** What the VMM attaches for an instance's mounts, parents first. */
  vmVolumes(mounts: readonly VolumeMount[]): VmVolume[] {
    return mountOrder(mounts).map((m) => ({
      kind: m.type === 'bind' ? 'share' : 'disk',
      hostPath: m.type === 'bind' ? m.source : this.fileOf(m.source),
      guestPath: m.target,
      readOnly: m.readOnly,
    }));
  }

  private usersOf(name: string): InstanceRow[] {
    return this.registry.listInstances().filter((r) => r.volumes.some((v) => v.type === 'volume' && v.source === name));
  }

  private require(name: string): VolumeRow {
    checkName(name);
    const row = this.registry.getVolume(name);
    if (!row) throw new AegisError('NOT_FOUND', `no volume "${name}" (see: aegis volume list)`);
    return row;
  }

  private async view(row: VolumeRow): Promise<VolumeView> {
    const st = await fs.stat(this.fileOf(row.name)).catch(() => undefined);
    return {
      name: row.name,
      sizeMiB: row.sizeMiB,
      createdAt: new Date(row.createdAt).toISOString(),
      allocatedBytes: st ? st.blocks * 512 : 0,
      usedBy: this.usersOf(row.name).map((r) => r.handle),
    };
  }
}

function checkName(name: string): void {
  if (!VOLUME_NAME.test(name)) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `"${name.slice(0, 80)}" is not a volume name: letters, digits, _ . - (starting with a letter or digit), at most 64`,
    );
  }
}
