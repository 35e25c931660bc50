/**
 * The registry: instances (and later secrets, images) in one SQLite file, WAL mode, with
 * numbered migrations tracked in `PRAGMA user_version`. Only this module speaks SQL.
 */
import { chmodSync } from 'node:fs';
import Database from 'better-sqlite3';
import { AegisError } from '@aegis/protocol';
import type { InstanceState } from '../instances/state.js';
import type { NetworkMode } from '@aegis/protocol/api';
import type { PortMapping } from '../ports/forwarder.js';
import type { VolumeMount } from '../volumes/mounts.js';

const MIGRATIONS: string[] = [
  `CREATE TABLE instances (
     id          TEXT PRIMARY KEY,
     handle      TEXT NOT NULL UNIQUE,
     state       TEXT NOT NULL,
     command     TEXT NOT NULL,          -- JSON argv
     workdir     TEXT,
     memory_mib  INTEGER NOT NULL,
     vcpu_count  INTEGER NOT NULL,
     backend     TEXT NOT NULL,
     vm_record   TEXT,                   -- JSON, opaque to us: the backend finds its VM with it
     exit_code   INTEGER,
     state_reason TEXT,
     created_at  INTEGER NOT NULL,
     started_at  INTEGER,
     stopped_at  INTEGER,
     updated_at  INTEGER NOT NULL
   )`,
  `CREATE TABLE secrets (
     name        TEXT PRIMARY KEY,
     value       BLOB NOT NULL,          -- iv || GCM tag || ciphertext; never plaintext
     created_at  INTEGER NOT NULL,
     updated_at  INTEGER NOT NULL
   )`,
  // JSON PortMapping[]. (No SQL comment here: SQLite splices the column text into the stored
  // CREATE TABLE, and a trailing comment would swallow its closing parenthesis.)
  `ALTER TABLE instances ADD COLUMN ports TEXT NOT NULL DEFAULT '[]'`,
  // Instances created before guest networking existed had no network device.
  `ALTER TABLE instances ADD COLUMN network TEXT NOT NULL DEFAULT 'none'`,
  // One row per image (manifest digest); its filesystem is prepared once and shared.
  `CREATE TABLE images (
     digest      TEXT PRIMARY KEY,
     image       TEXT NOT NULL,          -- JSON: config, layers, sizes (images/service.ts)
     created_at  INTEGER NOT NULL
   )`,
  `CREATE TABLE image_refs (
     reference   TEXT PRIMARY KEY,
     digest      TEXT NOT NULL REFERENCES images(digest) ON DELETE CASCADE
   )`,
  // JSON {reference?, digest} of the instance's image; NULL for the base rootfs.
  `ALTER TABLE instances ADD COLUMN image TEXT`,
  // JSON InstanceSpec: what a restart needs that no other column holds.
  `ALTER TABLE instances ADD COLUMN spec TEXT NOT NULL DEFAULT '{}'`,
  // Named volumes: ext4 files under AEGIS_HOME/volumes, kept when instances go.
  `CREATE TABLE volumes (
     name        TEXT PRIMARY KEY,
     size_mib    INTEGER NOT NULL,
     created_at  INTEGER NOT NULL
   )`,
  // JSON VolumeMount[]: the instance's host directories and named volumes (docker -v).
  `ALTER TABLE instances ADD COLUMN volumes TEXT NOT NULL DEFAULT '[]'`,
  // JSON string[]: the hosts a brokered secret's value may go to (egress/broker.ts); [] hands it over.
  `ALTER TABLE secrets ADD COLUMN hosts TEXT NOT NULL DEFAULT '[]'`,
  // The lifecycle events `aegis events` streams (events/bus.ts), a bounded history: the whole
  // event as the API gives it in \`event\` (JSON), what it is filtered by in columns.
  `CREATE TABLE events (
     seq         INTEGER PRIMARY KEY AUTOINCREMENT,
     time_ms     INTEGER NOT NULL,
     type        TEXT NOT NULL,
     instance_id TEXT,
     event       TEXT NOT NULL
   )`,
  `CREATE INDEX events_time ON events(time_ms)`,
];

/** The schema version this build writes (PRAGMA user_version). */
export const SCHEMA_VERSION = MIGRATIONS.length;

export interface SecretRow {
  name: string;
  value: Buffer;
  /** Where a brokered secret's value may go; empty: into the environment as is. */
  hosts: string[];
  createdAt: number;
  updatedAt: number;
}

interface RawSecret {
  name: string;
  value: Buffer;
  hosts: string;
  created_at: number;
  updated_at: number;
}

interface RawVolume {
  name: string;
  size_mib: number;
  created_at: number;
}

const volumeFromRaw = (r: RawVolume): VolumeRow => ({ name: r.name, sizeMiB: r.size_mib, createdAt: r.created_at });

const secretFromRaw = (r: RawSecret): SecretRow => ({
  name: r.name,
  value: r.value,
  hosts: JSON.parse(r.hosts) as string[],
  createdAt: r.created_at,
  updatedAt: r.updated_at,
});

export interface InstanceRow {
  id: string;
  handle: string;
  state: InstanceState;
  command: string[];
  workdir: string | null;
  memoryMiB: number;
  vcpuCount: number;
  backend: string;
  vmRecord: Record<string, unknown> | null;
  exitCode: number | null;
  stateReason: string | null;
  createdAt: number;
  startedAt: number | null;
  stoppedAt: number | null;
  /** Exposed ports, with the host ports actually bound. */
  ports: PortMapping[];
  network: NetworkMode;
  image: InstanceImage | null;
  spec: InstanceSpec;
  /** Host directories and named volumes, in the order they are mounted. */
  volumes: VolumeMount[];
}

/**
 * The rest of how an instance was asked for, kept to restart it. `env` holds only what was
 * given with --env (plain, as Docker keeps it); secrets are kept by name, never by value.
 */
export interface InstanceSpec {
  env: Record<string, string>;
  secrets: string[];
  user?: string;
  /** The workload's stdin was kept open (docker run -i): a restart keeps it open too. */
  stdin?: boolean;
  tty?: { rows: number; cols: number };
  /** Docker's labels: the user's key/value tags, for finding and filtering instances. */
  labels?: Record<string, string>;
  /** Stopped (and, with autoRemove, deleted) at this time, epoch ms; absent: no deadline. */
  deadlineAtMs?: number;
  /** The run time it was given (`--timeout`): a restart gets a new deadline this far away. */
  timeoutMs?: number;
  /** Created as throwaway (`run`, the SDK): its deadline deletes it, not only stops it. */
  autoRemove?: boolean;
  /** `--idle-pause`: paused after this long unused, woken by the next use (instances/idle.ts). */
  idlePauseMs?: number;
  /** `--idle-hibernate`: hibernated after this long unused (after its idle pause, when it has one). */
  idleHibernateMs?: number;
  /** `--egress-allow` / `--egress-deny`, with what `egress allow|deny` added while it ran. */
  egress?: { allow: string[]; deny: string[]; privateRanges?: 'named' | 'never' };
  /** Started from this snapshot: its disk is a copy-on-write child of the snapshot's. */
  snapshot?: string;
  /**
   * The instance whose identity the guest's memory holds (secret placeholders, the egress CA it
   * trusts): the first of a line of snapshots and forks. Absent: its own id.
   */
  identityOf?: string;
}

/** The image an instance runs: the digest pins it; the reference is how the user named it. */
export interface InstanceImage {
  reference?: string;
  digest: string;
}

export interface VolumeRow {
  name: string;
  sizeMiB: number;
  createdAt: number;
}

export interface ImageRow {
  digest: string;
  /** Opaque to the registry: the image service's own JSON. */
  image: string;
  createdAt: number;
  references: string[];
}

interface RawRow {
  id: string;
  handle: string;
  state: string;
  command: string;
  workdir: string | null;
  memory_mib: number;
  vcpu_count: number;
  backend: string;
  vm_record: string | null;
  exit_code: number | null;
  state_reason: string | null;
  created_at: number;
  started_at: number | null;
  stopped_at: number | null;
  ports: string;
  network: string;
  image: string | null;
  spec: string;
  volumes: string;
}

function fromRaw(r: RawRow): InstanceRow {
  return {
    id: r.id,
    handle: r.handle,
    state: r.state as InstanceState,
    command: JSON.parse(r.command) as string[],
    workdir: r.workdir,
    memoryMiB: r.memory_mib,
    vcpuCount: r.vcpu_count,
    backend: r.backend,
    vmRecord: r.vm_record === null ? null : (JSON.parse(r.vm_record) as Record<string, unknown>),
    exitCode: r.exit_code,
    stateReason: r.state_reason,
    createdAt: r.created_at,
    startedAt: r.started_at,
    stoppedAt: r.stopped_at,
    ports: JSON.parse(r.ports) as PortMapping[],
    network: r.network === 'user' || r.network === 'unfiltered' ? r.network : 'none',
    image: r.image === null ? null : (JSON.parse(r.image) as InstanceImage),
    spec: { env: {}, secrets: [], ...(JSON.parse(r.spec) as Partial<InstanceSpec>) },
    volumes: JSON.parse(r.volumes) as VolumeMount[],
  };
}

export type InstancePatch = Partial<Pick<InstanceRow, 'state' | 'vmRecord' | 'exitCode' | 'stateReason' | 'startedAt' | 'stoppedAt'>>;

const COLUMNS: Record<keyof InstancePatch, string> = {
  state: 'state',
  vmRecord: 'vm_record',
  exitCode: 'exit_code',
  stateReason: 'state_reason',
  startedAt: 'started_at',
  stoppedAt: 'stopped_at',
};

/** Sets umask 077; returns what restores the old one. A worker thread may not set it: chmod still follows. */
function tightUmask(): () => void {
  let old: number;
  try {
    old = process.umask(0o077);
  } catch {
    return () => undefined;
  }
  return () => void process.umask(old);
}

function chmodIfExists(file: string, mode: number): void {
  try {
    chmodSync(file, mode);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
}

export class Registry {
  private readonly db: Database.Database;

  constructor(file: string) {
    // Owner-only (0600), the database and its -wal/-shm: created under a tight umask (the
    // constructor is synchronous, so nothing else runs meanwhile), and tightened when an
    // older aegisd left them 0644.
    const restoreUmask = tightUmask();
    try {
      this.db = new Database(file);
      this.db.pragma('journal_mode = WAL');
    } finally {
      restoreUmask();
    }
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
    try {
      for (const f of [file, `${file}-wal`, `${file}-shm`]) chmodIfExists(f, 0o600);
      this.migrate();
    } catch (err) {
      this.db.close();
      throw err;
    }
  }

  private migrate(): void {
    const current = this.db.pragma('user_version', { simple: true }) as number;
    if (current > MIGRATIONS.length) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `registry schema v${current} is newer than this aegisd (v${MIGRATIONS.length}); upgrade aegis`,
      );
    }
    for (let v = current; v < MIGRATIONS.length; v++) {
      this.db.transaction(() => {
        this.db.exec(MIGRATIONS[v] ?? '');
        this.db.pragma(`user_version = ${v + 1}`);
      })();
    }
  }

  close(): void {
    this.db.close();
  }

  insertInstance(row: InstanceRow): void {
    try {
      this.db
        .prepare(
          `INSERT INTO instances (id, handle, state, command, workdir, memory_mib, vcpu_count, backend, vm_record,
             exit_code, state_reason, created_at, started_at, stopped_at, updated_at, ports, network, image, spec, volumes)
           VALUES (@id, @handle, @state, @command, @workdir, @memoryMiB, @vcpuCount, @backend, @vmRecord,
             @exitCode, @stateReason, @createdAt, @startedAt, @stoppedAt, @createdAt, @ports, @network, @image, @spec, @volumes)`,
        )
        .run({
          ...row,
          command: JSON.stringify(row.command),
          vmRecord: row.vmRecord && JSON.stringify(row.vmRecord),
          ports: JSON.stringify(row.ports),
          image: row.image && JSON.stringify(row.image),
          spec: JSON.stringify(row.spec),
          volumes: JSON.stringify(row.volumes),
        });
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_UNIQUE') {
        throw new AegisError('ALREADY_EXISTS', `an instance named "${row.handle}" already exists; pick another --name or delete it`);
      }
      throw err;
    }
  }

  updateInstance(id: string, patch: InstancePatch): void {
    const sets: string[] = ['updated_at = @updatedAt'];
    const params: Record<string, unknown> = { id, updatedAt: Date.now() };
    for (const [k, v] of Object.entries(patch) as [keyof InstancePatch, unknown][]) {
      sets.push(`${COLUMNS[k]} = @${k}`);
      params[k] = k === 'vmRecord' && v !== null ? JSON.stringify(v) : v;
    }
    this.db.prepare(`UPDATE instances SET ${sets.join(', ')} WHERE id = @id`).run(params);
  }

  /** Replaces the instance's spec (a new deadline, say). */
  setInstanceSpec(id: string, spec: InstanceSpec): void {
    this.db.prepare('UPDATE instances SET spec = ?, updated_at = ? WHERE id = ?').run(JSON.stringify(spec), Date.now(), id);
  }

  /**
   * Compare-and-set: moves the instance to `patch.state` only if it is still in `from`.
   * False when another path changed it first (the caller decides what that means).
   */
  transitionInstance(id: string, from: InstanceRow['state'], patch: InstancePatch & { state: InstanceRow['state'] }): boolean {
    const sets: string[] = ['updated_at = @updatedAt'];
    const params: Record<string, unknown> = { id, from, updatedAt: Date.now() };
    for (const [k, v] of Object.entries(patch) as [keyof InstancePatch, unknown][]) {
      sets.push(`${COLUMNS[k]} = @${k}`);
      params[k] = k === 'vmRecord' && v !== null ? JSON.stringify(v) : v;
    }
    return this.db.prepare(`UPDATE instances SET ${sets.join(', ')} WHERE id = @id AND state = @from`).run(params).changes === 1;
  }

  deleteInstance(id: string): void {
    this.db.prepare('DELETE FROM instances WHERE id = ?').run(id);
  }

  getInstance(id: string): InstanceRow | undefined {
    const r = this.db.prepare('SELECT * FROM instances WHERE id = ?').get(id) as RawRow | undefined;
    return r && fromRaw(r);
  }

  listInstances(): InstanceRow[] {
    return (this.db.prepare('SELECT * FROM instances ORDER BY created_at').all() as RawRow[]).map(fromRaw);
  }

  putSecret(name: string, value: Buffer, now: number, hosts: string[] = []): SecretRow {
    this.db
      .prepare(
        `INSERT INTO secrets (name, value, hosts, created_at, updated_at) VALUES (?, ?, ?, ?, ?)
         ON CONFLICT(name) DO UPDATE SET value = excluded.value, hosts = excluded.hosts, updated_at = excluded.updated_at`,
      )
      .run(name, value, JSON.stringify(hosts), now, now);
    const row = this.getSecret(name);
    if (!row) throw new AegisError('INTERNAL', 'secret vanished after write');
    return row;
  }

  getSecret(name: string): SecretRow | undefined {
    const r = this.db.prepare('SELECT * FROM secrets WHERE name = ?').get(name) as RawSecret | undefined;
    return r && secretFromRaw(r);
  }

  listSecrets(): SecretRow[] {
    return (this.db.prepare('SELECT * FROM secrets ORDER BY name').all() as RawSecret[]).map(secretFromRaw);
  }

  deleteSecret(name: string): boolean {
    return this.db.prepare('DELETE FROM secrets WHERE name = ?').run(name).changes > 0;
  }

  /** ALREADY_EXISTS when the name is taken. */
  insertVolume(row: VolumeRow): void {
    try {
      this.db.prepare('INSERT INTO volumes (name, size_mib, created_at) VALUES (?, ?, ?)').run(row.name, row.sizeMiB, row.createdAt);
    } catch (err) {
      if ((err as { code?: string }).code === 'SQLITE_CONSTRAINT_PRIMARYKEY') {
        throw new AegisError('ALREADY_EXISTS', `a volume named "${row.name}" already exists`);
      }
      throw err;
    }
  }

  getVolume(name: string): VolumeRow | undefined {
    const r = this.db.prepare('SELECT * FROM volumes WHERE name = ?').get(name) as RawVolume | undefined;
    return r && volumeFromRaw(r);
  }

  listVolumes(): VolumeRow[] {
    return (this.db.prepare('SELECT * FROM volumes ORDER BY name').all() as RawVolume[]).map(volumeFromRaw);
  }

  deleteVolume(name: string): void {
    this.db.prepare('DELETE FROM volumes WHERE name = ?').run(name);
  }

  /** Records an image (or refreshes it) and points `references` at it, atomically. */
  putImage(digest: string, image: string, references: string[], now: number): void {
    this.db.transaction(() => {
      this.db
        .prepare('INSERT INTO images (digest, image, created_at) VALUES (?, ?, ?) ON CONFLICT(digest) DO UPDATE SET image = excluded.image')
        .run(digest, image, now);
      const put = this.db.prepare(
        'INSERT INTO image_refs (reference, digest) VALUES (?, ?) ON CONFLICT(reference) DO UPDATE SET digest = excluded.digest',
      );
      for (const r of references) put.run(r, digest);
    })();
  }

  getImage(digest: string): ImageRow | undefined {
    const r = this.db.prepare('SELECT * FROM images WHERE digest = ?').get(digest) as
      { digest: string; image: string; created_at: number } | undefined;
    if (!r) return undefined;
    const refs = (
      this.db.prepare('SELECT reference FROM image_refs WHERE digest = ? ORDER BY reference').all(digest) as { reference: string }[]
    ).map((x) => x.reference);
    return { digest: r.digest, image: r.image, createdAt: r.created_at, references: refs };
  }

  listImages(): ImageRow[] {
    const digests = this.db.prepare('SELECT digest FROM images ORDER BY created_at').all() as { digest: string }[];
    return digests.flatMap((d) => this.getImage(d.digest) ?? []);
  }

  /** The digest a reference points at, if any. */
  imageDigestOf(reference: string): string | undefined {
    return (this.db.prepare('SELECT digest FROM image_refs WHERE reference = ?').get(reference) as { digest: string } | undefined)?.digest;
  }

  deleteImageRef(reference: string): void {
    this.db.prepare('DELETE FROM image_refs WHERE reference = ?').run(reference);
  }

  deleteImage(digest: string): void {
    this.db.transaction(() => {
      this.db.prepare('DELETE FROM image_refs WHERE digest = ?').run(digest);
      this.db.prepare('DELETE FROM images WHERE digest = ?').run(digest);
    })();
  }

  /** Stores an event (its JSON without `seq`); returns the sequence number it was given. */
  insertEvent(timeMs: number, type: string, instanceId: string | undefined, event: string): number {
    const r = this.db
      .prepare('INSERT INTO events (time_ms, type, instance_id, event) VALUES (?, ?, ?, ?)')
      .run(timeMs, type, instanceId ?? null, event);
    return Number(r.lastInsertRowid);
  }

  /** Events after sequence number `afterSeq`, from `sinceMs` on, oldest first, at most `limit`. */
  listEvents(afterSeq: number, sinceMs: number, limit: number): { seq: number; event: string }[] {
    return this.db
      .prepare('SELECT seq, event FROM events WHERE seq > ? AND time_ms >= ? ORDER BY seq LIMIT ?')
      .all(afterSeq, sinceMs, limit) as { seq: number; event: string }[];
  }

  /** Keeps the newest `keep` events. */
  pruneEvents(keep: number): void {
    this.db.prepare('DELETE FROM events WHERE seq <= (SELECT MAX(seq) FROM events) - ?').run(keep);
  }

  /** Resolves a handle, a full id, or a unique id prefix (as Docker does). */
  resolveInstance(ref: string): InstanceRow {
    const byHandle = this.db.prepare('SELECT * FROM instances WHERE handle = ?').get(ref) as RawRow | undefined;
    if (byHandle) return fromRaw(byHandle);
    // Ids are lowercase hex: a prefix is compared exactly (LIKE would ignore case and wildcards).
    const rows =
      ref === '' ? [] : (this.db.prepare('SELECT * FROM instances WHERE substr(id, 1, ?) = ? LIMIT 2').all(ref.length, ref) as RawRow[]);
    if (rows.length === 1 && rows[0]) return fromRaw(rows[0]);
    if (rows.length > 1) throw new AegisError('INVALID_ARGUMENT', `"${ref}" matches more than one instance id; give more characters`);
    throw new AegisError('NOT_FOUND', `no instance "${ref}" (see: aegis instance list --all)`);
  }
}
