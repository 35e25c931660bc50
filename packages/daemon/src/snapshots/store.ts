/**
 * Checkpoints of running instances (`aegis snapshot create`, `fork`), kept as files under
 * `$AEGIS_HOME/snapshots/<name>/`:
 *
 *     meta.json   what it is: the machine it needs, the instance it was taken of, sizes, checksum
 *     state       the VMM's device and RAM state (QEMU: a migration stream; Firecracker: its
 *                 snapshot file, with the guest RAM beside it in state.mem)
 *     disk        the instance's disk at that moment (raw, sparse): the copy-on-write base of
 *                 every instance started from it, so it is never written again
 *
 * A snapshot is written in a work directory and renamed into place whole, so a crash leaves
 * none half-made; one whose files are missing, of the wrong size or checksum is refused with a
 * clear error before anything boots from it.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { MachineRecord } from '../instances/machine.js';
import type { VolumeMount } from '../volumes/mounts.js';

/** What an instance started from a snapshot inherits (it carries on the same workload). */
export interface SnapshotInstance {
  id: string;
  handle: string;
  command: string[];
  workdir: string | null;
  network: string;
  image: { reference?: string; digest: string } | null;
  env: Record<string, string>;
  secrets: string[];
  user?: string;
  labels?: Record<string, string>;
  egress?: { allow: string[]; deny: string[]; privateRanges?: 'named' | 'never' };
  /** Guest ports it exposed (a new instance gets new host ports for them). */
  guestPorts: number[];
  volumes: VolumeMount[];
  /** Whose secret placeholders and CA the guest holds (the first instance of the line). */
  identityOf: string;
}

export interface SnapshotMeta {
  format: 1;
  name: string;
  createdAt: number;
  /** Made by `fork`: removed with the last instance started from it. */
  auto: boolean;
  machine: MachineRecord;
  instance: SnapshotInstance;
  stateBytes: number;
  diskBytes: number;
  /** Bytes the disk file takes (it is sparse). */
  diskAllocatedBytes: number;
  stateSha256: string;
  /** Files the VMM wrote beside `state` (Firecracker's `state.mem`): name → bytes. */
  stateFiles?: Record<string, number>;
}

export interface Snapshot {
  meta: SnapshotMeta;
  dir: string;
  state: string;
  disk: string;
}

const NAME = /^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$/;
const FORMAT = 1;

export function checkSnapshotName(name: string): void {
  if (!NAME.test(name)) {
    throw new AegisError('INVALID_ARGUMENT', `snapshot name "${name}" must be 1-128 of [a-zA-Z0-9_.-], starting with a letter or digit`);
  }
}

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 1 << 20 })) h.update(chunk as Buffer);
  return h.digest('hex');
}

export class SnapshotStore {
  constructor(readonly dir: string) {}

  private pathOf(name: string): string {
    checkSnapshotName(name);
    return path.join(this.dir, name);
  }

  /** A work directory for a new snapshot (QEMU's `exec:` takes plain paths only: no odd characters). */
  async begin(name: string): Promise<string> {
    checkSnapshotName(name);
    if (await this.exists(name)) throw new AegisError('ALREADY_EXISTS', `snapshot "${name}" already exists`);
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const work = path.join(this.dir, `.work-${randomBytes(6).toString('hex')}`);
    await fs.mkdir(work, { mode: 0o700 });
    return work;
  }

  /** Checksums and seals what `begin`'s directory holds (`state`, `disk`) and puts it in place. */
  async commit(
    work: string,
    meta: Omit<SnapshotMeta, 'format' | 'stateBytes' | 'diskBytes' | 'diskAllocatedBytes' | 'stateSha256' | 'stateFiles'>,
  ): Promise<Snapshot> {
    const state = path.join(work, 'state');
    const disk = path.join(work, 'disk');
    const [st, dk] = await Promise.all([fs.stat(state), fs.stat(disk)]);
    const stateFiles: Record<string, number> = {};
    for (const name of await fs.readdir(work)) {
      if (name === 'state' || name === 'disk') continue;
      const f = path.join(work, name);
      stateFiles[name] = (await fs.stat(f)).size;
      await fs.chmod(f, 0o400);
    }
    const full: SnapshotMeta = {
      format: FORMAT,
      ...meta,
      stateBytes: st.size,
      diskBytes: dk.size,
      diskAllocatedBytes: dk.blocks * 512,
      stateSha256: await sha256(state),
      ...(Object.keys(stateFiles).length > 0 ? { stateFiles } : {}),
    };
    for (const f of [state, disk]) await fs.chmod(f, 0o400);
    await fs.writeFile(path.join(work, 'meta.json'), JSON.stringify(full, null, 2), { mode: 0o400 });
    const dest = this.pathOf(meta.name);
    try {
      await fs.rename(work, dest);
    } catch (err) {
      await fs.rm(work, { recursive: true, force: true });
      if ((err as NodeJS.ErrnoException).code === 'ENOTEMPTY' || (err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new AegisError('ALREADY_EXISTS', `snapshot "${meta.name}" already exists`);
      }
      throw err;
    }
    return { meta: full, dir: dest, state: path.join(dest, 'state'), disk: path.join(dest, 'disk') };
  }

  async abort(work: string): Promise<void> {
    await fs.rm(work, { recursive: true, force: true });
  }

  async exists(name: string): Promise<boolean> {
    return fs.stat(this.pathOf(name)).then(
      () => true,
      () => false,
    );
  }

  /** Its record, read and checked for shape (not its files' contents: `verify` does). */
  async get(name: string): Promise<Snapshot> {
    const dir = this.pathOf(name);
    let meta: SnapshotMeta;
    try {
      meta = JSON.parse(await fs.readFile(path.join(dir, 'meta.json'), 'utf8')) as SnapshotMeta;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT' && !(await fs.stat(dir).catch(() => undefined))) {
        throw new AegisError('NOT_FOUND', `no snapshot "${name}" (aegis snapshot ls lists them)`);
      }
      throw new AegisError(
        'FAILED_PRECONDITION',
        `snapshot "${name}" is damaged: its meta.json cannot be read; remove it (aegis snapshot rm ${name})`,
      );
    }
    if (meta.format !== FORMAT || meta.name !== name || !meta.machine || !meta.instance) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `snapshot "${name}" is damaged or of another version; remove it (aegis snapshot rm ${name})`,
      );
    }
    return { meta, dir, state: path.join(dir, 'state'), disk: path.join(dir, 'disk') };
  }

  /** Its files are all there, whole: sizes, and the state's checksum (a restore reads every byte of it anyway). */
  async verify(s: Snapshot, options: { checksum?: boolean } = {}): Promise<void> {
    const damaged = (why: string): AegisError =>
      new AegisError('FAILED_PRECONDITION', `snapshot "${s.meta.name}" is damaged (${why}); nothing was started from it`);
    for (const [file, bytes] of [
      [s.state, s.meta.stateBytes],
      [s.disk, s.meta.diskBytes],
      ...Object.entries(s.meta.stateFiles ?? {}).map(([name, n]) => [path.join(s.dir, name), n] as const),
    ] as const) {
      const st = await fs.stat(file).catch(() => undefined);
      if (!st) throw damaged(`${path.basename(file)} is missing`);
      if (st.size !== bytes) throw damaged(`${path.basename(file)} is ${st.size} bytes, not ${bytes}`);
    }
    if (options.checksum !== false && (await sha256(s.state)) !== s.meta.stateSha256)
      throw damaged('its state does not match its checksum');
    for (const f of [s.meta.machine.kernelPath, s.meta.machine.rootfsPath, s.meta.machine.imageDiskPath]) {
      if (f && !(await fs.stat(f).catch(() => undefined))) throw damaged(`the machine it needs is gone: ${f}`);
    }
  }

  async list(): Promise<Snapshot[]> {
    const names = await fs.readdir(this.dir).catch(() => [] as string[]);
    const out: Snapshot[] = [];
    for (const name of names.filter((n) => NAME.test(n)).sort()) {
      try {
        out.push(await this.get(name));
      } catch {
        // damaged: `get` names it; the list shows the sound ones
      }
    }
    return out;
  }

  async remove(name: string): Promise<void> {
    const dir = this.pathOf(name);
    if (!(await fs.stat(dir).catch(() => undefined)))
      throw new AegisError('NOT_FOUND', `no snapshot "${name}" (aegis snapshot ls lists them)`);
    // Renamed away first: a concurrent start sees it gone, never half-removed.
    const gone = path.join(this.dir, `.gone-${randomBytes(6).toString('hex')}`);
    await fs.rename(dir, gone);
    await fs.rm(gone, { recursive: true, force: true });
  }

  /** What a crash left: work directories and half-removed ones. */
  async sweep(): Promise<void> {
    for (const n of await fs.readdir(this.dir).catch(() => [] as string[])) {
      if (n.startsWith('.work-') || n.startsWith('.gone-')) await fs.rm(path.join(this.dir, n), { recursive: true, force: true });
    }
  }
}
