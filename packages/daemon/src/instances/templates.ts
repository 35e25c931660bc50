/**
 * Warm boot. A template is a VM booted once, with its RAM in a file, to the point where its
 * harness answers; then its device state is saved. A new instance of the same shape maps that
 * RAM file copy-on-write (pages come from the host's page cache on demand, and stay shared
 * between instances until written), loads the device state, and runs on a copy-on-write child
 * of the template's disk, instead of booting the kernel and starting Node again; the host then makes it its own (clock, hostname, a
 * reseeded RNG: the harness's `fresh`). The template holds no instance data and no secrets.
 *
 * Templates are keyed by everything that shapes the machine (kernel, rootfs, memory, vCPUs,
 * disk size, network mode, VMM version) and live beside the guest artifacts, so every AEGIS_HOME using the
 * same artifacts shares them. They are built in the background; until one is ready, instances
 * boot cold.
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import type { Backend, NetworkMode, Probe, Vm } from '@aegis/vmm';
import type { Logger } from '../log.js';
import { AgentConnection } from './agent.js';
import { makeScratchDisk } from './disks.js';

/** Bump when what goes into a template changes. */
const TEMPLATE_FORMAT = 3;
/** A build lock older than this was left by a crashed builder. */
const STALE_LOCK_MS = 5 * 60_000;

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
  /** Device state (tens of KiB). */
  snapshot: string;
  /** Guest RAM at the moment of the snapshot; clones map it copy-on-write. */
  memory: string;
  scratch: string;
}

export class TemplateCache {
  private readonly building = new Map<string, Promise<void>>();

  constructor(
    private readonly backend: Backend,
    private readonly probe: Probe,
    private readonly dir: string,
    private readonly log: Logger,
    private readonly bootTimeoutMs: number,
    readonly enabled: boolean,
  ) {}

  private key(shape: MachineShape): string {
    const h = createHash('sha256');
    h.update(JSON.stringify({ f: TEMPLATE_FORMAT, b: this.backend.name, v: this.probe.detail, ...shape }));
    return h.digest('hex').slice(0, 20);
  }

  /** A ready template for this shape, or undefined (and one is started for next time). */
  lookup(shape: MachineShape): Template | undefined {
    if (!this.enabled || !this.probe.capabilities?.snapshot) return undefined;
    const key = this.key(shape);
    const dir = path.join(this.dir, key);
    if (existsSync(path.join(dir, 'ready'))) {
      return { key, snapshot: path.join(dir, 'snapshot.bin'), memory: path.join(dir, 'memory'), scratch: path.join(dir, 'scratch.img') };
    }
    void this.ensure(shape);
    return undefined;
  }

  /** Builds the template for this shape unless it exists or is being built (here or elsewhere). */
  ensure(shape: MachineShape): Promise<void> {
    if (!this.enabled || !this.probe.capabilities?.snapshot) return Promise.resolve();
    const key = this.key(shape);
    const running = this.building.get(key);
    if (running) return running;
    const p = this.build(key, shape)
      .catch((err: unknown) => this.log.warn(`template ${key}: not built: ${(err as Error).message}`))
      .finally(() => this.building.delete(key));
    this.building.set(key, p);
    return p;
  }

  /** A template whose restore failed is set aside so that instances boot cold again. */
  async discard(t: Template): Promise<void> {
    const dir = path.join(this.dir, t.key);
    await fs.rm(path.join(dir, 'ready'), { force: true });
    this.log.warn(`template ${t.key}: discarded after a failed restore`);
  }

  /**
   * Removes set-aside templates. Running VMs keep their open disk and memory files; only a
   * stopped instance made from one loses its writable layer, which nothing reads again.
   */
  private async pruneOld(): Promise<void> {
    for (const name of await fs.readdir(this.dir)) {
      if (name.includes('.old-')) await fs.rm(path.join(this.dir, name), { recursive: true, force: true });
    }
  }

  private async build(key: string, shape: MachineShape): Promise<void> {
    const final = path.join(this.dir, key);
    if (existsSync(path.join(final, 'ready'))) return;
    await fs.mkdir(this.dir, { recursive: true, mode: 0o700 });
    const lock = path.join(this.dir, `${key}.lock`);
    try {
      await fs.mkdir(lock);
    } catch {
      const st = await fs.stat(lock).catch(() => undefined);
      if (st && Date.now() - st.mtimeMs < STALE_LOCK_MS) return; // someone else is building it
      await fs.rm(lock, { recursive: true, force: true });
      await fs.mkdir(lock);
    }
    const work = path.join(this.dir, `${key}.build-${process.pid}`);
    let vm: Vm | undefined;
    try {
      const started = Date.now();
      await fs.rm(work, { recursive: true, force: true });
      await fs.mkdir(work, { recursive: true, mode: 0o700 });
      const scratch = path.join(work, 'scratch.img');
      await makeScratchDisk(scratch, shape.scratchDiskMiB);
      vm = await this.backend.create({
        id: `template-${key}`,
        stateDir: work,
        kernelPath: shape.kernelPath,
        rootfsPath: shape.rootfsPath,
        scratchDiskPath: scratch,
        memoryMiB: shape.memoryMiB,
        vcpuCount: shape.vcpuCount,
        network: shape.network,
        ...(shape.imageDiskPath ? { imageDiskPath: shape.imageDiskPath } : {}),
        kernelArgs: [],
        memoryFile: { path: path.join(work, 'memory'), shared: true },
      });
      await vm.start();
      const agent = new AgentConnection(
        await vm.connectAgent(),
        () => undefined,
        () => undefined,
      );
      await agent.waitReady(this.bootTimeoutMs);
      await vm.saveSnapshot(path.join(work, 'snapshot.bin'));
      agent.close();
      await vm.stop({ timeoutMs: 1000 });
      vm = undefined;
      // The disk is now the backing file of every instance made from this template, and the
      // memory file their copy-on-write RAM: neither may change from here on.
      await fs.chmod(scratch, 0o400);
      await fs.chmod(path.join(work, 'memory'), 0o600);
      await fs.chmod(path.join(work, 'snapshot.bin'), 0o600);
      for (const f of await fs.readdir(work)) {
        if (!['scratch.img', 'snapshot.bin', 'memory'].includes(f)) await fs.rm(path.join(work, f), { force: true });
      }
      await fs.writeFile(path.join(work, 'ready'), `${new Date().toISOString()}\n`);
      // A discarded template may still back running instances' disks: move it aside, never delete.
      if (existsSync(final)) await fs.rename(final, `${final}.old-${Date.now()}`);
      await fs.rename(work, final);
      await this.pruneOld();
      this.log.info(`template ${key}: ready in ${Date.now() - started} ms (${shape.memoryMiB} MiB, ${shape.vcpuCount} vCPU)`);
    } finally {
      if (vm) await vm.stop({ timeoutMs: 1000 }).catch(() => undefined);
      await fs.rm(work, { recursive: true, force: true });
      await fs.rm(lock, { recursive: true, force: true });
    }
  }
}
