/**
 * Warm boot. A template is a VM booted once, with its RAM in a file, to the point where its
 * harness answers; then its device state is saved. A new instance of the same shape maps that
 * RAM file copy-on-write (pages come from the host's page cache on demand, and stay shared
 * between instances until written), loads the device state, and runs on a copy-on-write child
 * of the template's disk (made by the backend's `cloneDisk`), instead of booting the kernel and starting Node again; the host then makes it its own (clock, hostname, a
 * reseeded RNG: the harness's `fresh`). The template holds no instance data and no secrets.
 *
 * Templates are keyed by everything that shapes the machine (kernel, rootfs, memory, vCPUs,
 * disk size, network mode, backend and its version, accelerator) and live beside the guest artifacts, so
 * every AEGIS_HOME using the same artifacts shares them. They are built in the background;
 * until one is ready, instances boot cold.
 *
 * A built template is immutable: it lives in its own directory `<key>.<build>` whose name is
 * never reused and whose files are never written again, because every instance disk made from
 * it (running or stopped) is a copy-on-write child naming that directory's disk as its base.
 * `<key>.current` (a symlink, replaced atomically) says which build new instances use. An
 * instance disk registers itself under `refs/<build dir>/` before it is created; a build is
 * removed only when it is not current and every disk that referenced it is gone. Layout:
 *
 *     templates/<key>.<build>/{scratch.img,memory,snapshot.bin,ready}   read-only once built
 *     templates/<key>.current -> <key>.<build>
 *     templates/refs/<key>.<build>/<ref>      the path of one instance disk backed by it
 *     templates/<key>.lock/owner             pid of the builder
 *     templates/<key>.build-<pid>-<n>/       a build in progress (removed if its pid is dead)
 */
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, promises as fs, readlinkSync } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { NetworkMode } from '@aegis/protocol/api';
import { processAlive, type Backend, type Probe, type StrayProcess, type Vm } from '@aegis/vmm';
import { vmNetwork } from './network.js';
import type { Logger } from '../log.js';
import { AgentConnection } from './agent.js';
import { makeScratchDisk } from './disks.js';

/** Bump when what goes into a template changes. */
const TEMPLATE_FORMAT = 3;
/** A reference younger than this is kept even before its disk exists (it is being made). */
const REF_GRACE_MS = 60_000;
const BUILD_DIR = /^([0-9a-f]{20})\.build-(\d+)-/;
/** `<key>.b<16 hex>`: exactly a build's directory (never `.lock`, `.current` or a work dir). */
const TEMPLATE_DIR = /^[0-9a-f]{20}\.b[0-9a-f]{16}$/;

export interface MachineShape {
  kernelPath: string;
  rootfsPath: string;
  memoryMiB: number;
  vcpuCount: number;
  scratchDiskMiB: number;
  network: NetworkMode;
  /** An image's prepared filesystem (its path names its digest). */
  imageDiskPath?: string;
}

export interface Template {
  key: string;
  /** Its immutable directory's name, `<key>.<build>`. */
  build: string;
  /** Device state (tens of KiB). */
  snapshot: string;
  /** Guest RAM at the moment of the snapshot; clones map it copy-on-write. */
  memory: string;
  scratch: string;
}

export class TemplateCache {
  private readonly building = new Map<string, Promise<void>>();
  /** Cancels builds when the daemon shuts down. */
  private readonly abort = new AbortController();

  constructor(
    private readonly backend: Backend,
    /** The backend's latest probe: its accelerator can change once KVM has been tested. */
    private readonly probe: () => Probe,
    private readonly dir: string,
    private readonly log: Logger,
    private readonly bootTimeoutMs: number,
    readonly enabled: boolean,
  ) {}

  /** Names a machine shape: everything that shapes the machine, with the VMM and accelerator. */
  key(shape: MachineShape): string {
    const h = createHash('sha256');
    // A snapshot taken under TCG does not restore under KVM (nor one backend version's in another,
    // nor on a CPU with other features).
    const p = this.probe();
    h.update(
      JSON.stringify({
        f: TEMPLATE_FORMAT,
        b: this.backend.name,
        v: p.version ?? p.detail,
        a: p.capabilities?.acceleration,
        c: p.capabilities?.cpu,
        ...shape,
      }),
    );
    return h.digest('hex').slice(0, 20);
  }

  /** The VMM and accelerator in use: a snapshot restores only under the same (machine.ts). */
  vmmIdentity(): { backend: string; vmmVersion: string; acceleration: string; cpu: string } {
    const p = this.probe();
    return {
      backend: this.backend.name,
      vmmVersion: p.version ?? p.detail,
      acceleration: p.capabilities?.acceleration ?? 'unknown',
      cpu: p.capabilities?.cpu ?? 'unknown',
    };
  }

  /** Whether `t` is still the build new instances of its shape get (not replaced, not discarded). */
  isCurrent(t: Template): boolean {
    return this.current(t.key) === t.build;
  }

  private usable(): boolean {
    return this.enabled && this.probe().capabilities?.snapshot === true && !this.abort.signal.aborted;
  }

  private current(key: string): string | undefined {
    try {
      const build = readlinkSync(path.join(this.dir, `${key}.current`));
      return TEMPLATE_DIR.test(build) && existsSync(path.join(this.dir, build, 'ready')) ? build : undefined;
    } catch {
      return undefined;
    }
  }

  /** A ready template for this shape, or undefined (and one is started for next time). */
  lookup(shape: MachineShape): Template | undefined {
    if (!this.usable()) return undefined;
    const key = this.key(shape);
    const build = this.current(key);
    if (build) {
      const dir = path.join(this.dir, build);
      return {
        key,
        build,
        snapshot: path.join(dir, 'snapshot.bin'),
        memory: path.join(dir, 'memory'),
        scratch: path.join(dir, 'scratch.img'),
      };
    }
    void this.ensure(shape);
    return undefined;
  }

  /**
   * Records that `disk` (an instance's copy-on-write child) is backed by `t`: call before creating the
   * disk. The template's directory then stays until that disk is gone.
   */
  async reference(t: Template, disk: string): Promise<void> {
    const refs = path.join(this.dir, 'refs', t.build);
    await fs.mkdir(refs, { recursive: true, mode: 0o700 });
    const name = createHash('sha256').update(disk).digest('hex').slice(0, 24);
    await fs.writeFile(path.join(refs, name), disk, { mode: 0o600 });
  }

  /** Builds the template for this shape unless it exists or is being built (here or elsewhere). */
  ensure(shape: MachineShape): Promise<void> {
    if (!this.usable()) return Promise.resolve();
    const key = this.key(shape);
    const running = this.building.get(key);
    if (running) return running;
    const p = this.build(key, shape)
      .catch((err: unknown) => this.log.warn(`template ${key}: not built: ${(err as Error).message}`))
      .finally(() => this.building.delete(key));
    this.building.set(key, p);
    return p;
  }

  /**
   * A template whose restore failed is no longer current, so instances boot cold and a new one
   * is built. Its directory stays while instance disks reference it.
   */
  async discard(t: Template): Promise<void> {
    const link = path.join(this.dir, `${t.key}.current`);
    if (this.current(t.key) === t.build) await fs.rm(link, { force: true });
    this.log.warn(`template ${t.build}: discarded after a failed restore`);
    await this.collect();
  }

  /** Cancels builds in progress and waits until they have cleaned up (daemon shutdown). */
  async close(): Promise<void> {
    this.abort.abort();
    await Promise.allSettled([...this.building.values()]);
  }

  /**
   * Removes what nothing needs: builds left by dead daemons (and their VMMs), stale locks,
   * references whose disk is gone, and template directories neither current nor referenced.
   */
  async collect(): Promise<void> {
    const names = await fs.readdir(this.dir).catch(() => [] as string[]);
    // Processes of template builds: those of a dead daemon's build are ended with its directory.
    const strays = names.some((n) => BUILD_DIR.test(n)) ? await this.backend.strays(this.dir, []) : [];
    const current = new Set<string>();
    for (const n of names) {
      if (!n.endsWith('.current')) continue;
      const build = this.current(n.slice(0, -'.current'.length));
      if (build) current.add(build);
    }
    for (const n of names) {
      const b = BUILD_DIR.exec(n);
      if (b && !processAlive(Number(b[2]))) await this.removeBuild(path.join(this.dir, n), strays);
      if (n.endsWith('.lock')) {
        const owner = Number(await fs.readFile(path.join(this.dir, n, 'owner'), 'utf8').catch(() => '0'));
        if (!(owner > 0 && processAlive(owner))) await fs.rm(path.join(this.dir, n), { recursive: true, force: true });
      }
    }
    for (const n of names) {
      if (!TEMPLATE_DIR.test(n) || current.has(n)) continue;
      if (await this.referenced(n)) continue;
      await fs.rm(path.join(this.dir, n), { recursive: true, force: true });
      await fs.rm(path.join(this.dir, 'refs', n), { recursive: true, force: true });
      this.log.info(`template ${n}: removed (no longer current, no instance disk uses it)`);
    }
  }

  private async referenced(build: string): Promise<boolean> {
    const refs = path.join(this.dir, 'refs', build);
    let live = false;
    for (const r of await fs.readdir(refs).catch(() => [] as string[])) {
      const file = path.join(refs, r);
      const disk = await fs.readFile(file, 'utf8').catch(() => '');
      const st = await fs.stat(file).catch(() => undefined);
      if (existsSync(disk) || (st && Date.now() - st.mtimeMs < REF_GRACE_MS)) live = true;
      else await fs.rm(file, { force: true });
    }
    return live;
  }

  /** A build dir of a dead daemon: its VMM may still run (a SIGKILLed aegisd cannot stop it). */
  private async removeBuild(work: string, strays: StrayProcess[]): Promise<void> {
    for (const s of strays) if (s.owner === path.basename(work)) s.end();
    await fs.rm(work, { recursive: true, force: true });
    this.log.info(`template build ${path.basename(work)}: removed (left by a daemon that is gone)`);
  }

  private async lock(key: string): Promise<boolean> {
    const lock = path.join(this.dir, `${key}.lock`);
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        await fs.mkdir(lock);
        await fs.writeFile(path.join(lock, 'owner'), String(process.pid));
        return true;
      } catch {
        const owner = Number(await fs.readFile(path.join(lock, 'owner'), 'utf8').catch(() => '0'));
        const st = await fs.stat(lock).catch(() => undefined);
        // A lock without an owner file may be being made this instant: leave young ones alone.
        if (owner > 0 ? processAlive(owner) : st !== undefined && Date.now() - st.mtimeMs < 10_000) return false;
        await fs.rm(lock, { recursive: true, force: true });
      }
    }
    return false;
  }

  private async build(key: string, shape: MachineShape): Promise<void> {
    if (this.current(key)) return;
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    if (!(await this.lock(key))) return; // someone else is building it
    const lock = path.join(this.dir, `${key}.lock`);
    const work = path.join(this.dir, `${key}.build-${process.pid}-${randomBytes(3).toString('hex')}`);
    const signal = this.abort.signal;
    let vm: Vm | undefined;
    try {
      const started = Date.now();
      await fs.mkdir(work, { recursive: true, mode: 0o700 });
      const scratch = path.join(work, 'scratch.img');
      await makeScratchDisk(scratch, shape.scratchDiskMiB);
      signal.throwIfAborted();
      vm = await this.backend.create(
        {
          id: `template-${key}`,
          stateDir: work,
          kernelPath: shape.kernelPath,
          rootfsPath: shape.rootfsPath,
          scratchDiskPath: scratch,
          memoryMiB: shape.memoryMiB,
          vcpuCount: shape.vcpuCount,
          ...vmNetwork(shape.network),
          ...(shape.imageDiskPath ? { imageDiskPath: shape.imageDiskPath } : {}),
          snapshotMemory: { path: path.join(work, 'memory'), access: 'write' },
        },
        signal,
      );
      await vm.start(signal);
      const agent = new AgentConnection(
        await vm.connectAgent(signal),
        () => undefined,
        () => undefined,
      );
      try {
        await agent.waitReady(this.bootTimeoutMs, signal);
        signal.throwIfAborted();
        if (!vm.saveSnapshot) throw new AegisError('UNSUPPORTED', `the ${this.backend.name} backend cannot save snapshots`);
        await vm.saveSnapshot(path.join(work, 'snapshot.bin'), signal);
      } finally {
        agent.close();
      }
      await vm.stop({ timeoutMs: 1000 });
      vm = undefined;
      signal.throwIfAborted();
      // From here on the disk backs every instance made from this build and the memory file
      // is their copy-on-write RAM: nothing may write to them again. (A VMM may open the RAM
      // file read-write even to map it privately, so that one stays 0600.)
      for (const f of ['scratch.img', 'snapshot.bin']) await fs.chmod(path.join(work, f), 0o400);
      await fs.chmod(path.join(work, 'memory'), 0o600);
      for (const f of await fs.readdir(work)) {
        if (!['scratch.img', 'snapshot.bin', 'memory'].includes(f)) await fs.rm(path.join(work, f), { force: true });
      }
      await fs.writeFile(path.join(work, 'ready'), `${new Date().toISOString()}\n`, { mode: 0o400 });
      const build = `${key}.b${randomBytes(8).toString('hex')}`;
      await fs.rename(work, path.join(this.dir, build));
      const link = path.join(this.dir, `${key}.current`);
      const tmp = `${link}.${process.pid}.tmp`;
      await fs.rm(tmp, { force: true });
      await fs.symlink(build, tmp);
      await fs.rename(tmp, link); // atomic: a reader sees the old build or the new one
      this.log.info(`template ${key}: ready in ${Date.now() - started} ms (${shape.memoryMiB} MiB, ${shape.vcpuCount} vCPU) as ${build}`);
      await this.collect();
    } catch (err) {
      if (signal.aborted) throw new AegisError('CANCELLED', 'the daemon is shutting down');
      throw err;
    } finally {
      if (vm) await vm.stop({ timeoutMs: 1000 }).catch(() => undefined);
      await fs.rm(work, { recursive: true, force: true });
      await fs.rm(lock, { recursive: true, force: true });
    }
  }
}
