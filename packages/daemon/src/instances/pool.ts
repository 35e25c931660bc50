/**
 * The warm pool: VMs restored from a shape's template, run once through the paths a workload
 * takes (under emulation a restored VM translates every code path afresh, slowly, the first
 * time), then paused. `create` takes one instead of booting: it resumes it, gives it its
 * identity (`fresh`: clock, hostname, RNG reseed, machine-id) and starts the workload in it.
 * The pool refills in the background, one VM at a time.
 *
 * A pooled VM lives where the instance that takes it will: `instances/<id>/`, with that id; it
 * has no registry row until taken, so a daemon that dies leaves only a stray VMM and a
 * directory, both ended by the next daemon's recovery. It never holds instance data: no env,
 * no secrets, no command (they come with `run`), and its warm-up leaves no process or file.
 *
 * Which shapes: the daemon's default shape always (its kernel or rootfs can change: the pool
 * follows), and any other shape for a while after it was asked for. `size` VMs per shape,
 * within a budget of guest memory for the whole pool.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import type { ApiSchemas } from '@aegis/protocol/api';
import { AegisError, type ExecParams } from '@aegis/protocol';
import type { Backend, Vm } from '@aegis/vmm';
import type { Logger } from '../log.js';
import { AgentConnection } from './agent.js';
import { freshIdentity, startVm } from './boot.js';
import type { MachineShape, Template, TemplateCache } from './templates.js';

/** A shape other than the default one keeps its pool this long after it was last asked for. */
const SHAPE_KEEP_MS = 10 * 60_000;
const WARM_UP_TIMEOUT_MS = 30_000;
/** After a fill fails, the next try waits this long (a template that will not build, say). */
const RETRY_MS = 10_000;

export interface PooledVm {
  readonly id: string;
  readonly vm: Vm;
  readonly agent: AgentConnection;
  readonly template: Template;
  readonly key: string;
  readonly memoryMiB: number;
  /** Taken by an instance: the pool no longer owns it. */
  taken: boolean;
}

export interface PoolOptions {
  backend: Backend;
  templates: TemplateCache;
  instancesDir: string;
  log: Logger;
  bootTimeoutMs: number;
  /** VMs kept ready per shape (0: no pool). */
  size: number;
  /** Guest memory all pooled VMs together may have. */
  memoryBudgetMiB: number;
  /** The daemon's default shape as it is now (undefined: no guest artifacts yet). */
  defaultShape: () => Promise<MachineShape | undefined>;
}

/** The pool as `status` shows it (spec/openapi.json's Status.pool). */
export type PoolStatus = NonNullable<ApiSchemas['Status']['pool']>;
export type PoolShapeStatus = PoolStatus['shapes'][number];

interface Wanted {
  shape: MachineShape;
  lastAskedMs: number;
  isDefault: boolean;
}

export class WarmPool {
  private readonly ready = new Map<string, PooledVm[]>();
  private readonly wanted = new Map<string, Wanted>();
  private readonly abort = new AbortController();
  /** Being ended by the pool itself: its exit is no news. */
  private readonly ending = new WeakSet<PooledVm>();
  private filling: { key: string; memoryMiB: number } | undefined;
  private loop: Promise<void> | undefined;
  private again = false;
  private retryTimer: NodeJS.Timeout | undefined;
  private taken = 0;
  private missed = 0;

  constructor(private readonly o: PoolOptions) {}

  /** Starts filling the pool for the default shape. */
  start(): void {
    this.schedule();
  }

  /**
   * A ready VM of this shape, now theirs (paused: resume it), or undefined. Either way the
   * shape is wanted from now on and the pool refills behind the caller.
   */
  take(shape: MachineShape): PooledVm | undefined {
    if (this.abort.signal.aborted) return undefined;
    const key = this.o.templates.key(shape);
    const w = this.wanted.get(key);
    if (w) w.lastAskedMs = Date.now();
    else this.wanted.set(key, { shape, lastAskedMs: Date.now(), isDefault: false });
    const list = this.ready.get(key) ?? [];
    let got: PooledVm | undefined;
    while (!got && list.length > 0) {
      const p = list.shift()!;
      // Made from a template that has been replaced since (a new build, a failed restore).
      if (this.o.templates.isCurrent(p.template)) got = p;
      else void this.end(p);
    }
    if (got) {
      got.taken = true;
      this.taken++;
    } else this.missed++;
    this.schedule();
    return got;
  }

  /** A VM taken and not used (the create failed before anything ran in it): ready again. */
  giveBack(p: PooledVm): void {
    if (this.abort.signal.aborted) return void this.end(p);
    p.taken = false;
    this.taken--;
    const list = this.ready.get(p.key) ?? [];
    list.unshift(p);
    this.ready.set(p.key, list);
  }

  status(): PoolStatus {
    const shapes: PoolShapeStatus[] = [];
    for (const [key, w] of this.wanted) {
      shapes.push({
        memoryMiB: w.shape.memoryMiB,
        vcpuCount: w.shape.vcpuCount,
        network: w.shape.network,
        image: w.shape.imageDiskPath !== undefined,
        default: w.isDefault,
        ready: this.ready.get(key)?.length ?? 0,
      });
    }
    return {
      size: this.o.size,
      memoryBudgetMiB: this.o.memoryBudgetMiB,
      ready: shapes.reduce((n, s) => n + s.ready, 0),
      filling: this.filling !== undefined,
      taken: this.taken,
      missed: this.missed,
      shapes,
    };
  }

  /** Ends every pooled VM (daemon shutdown: they hold nothing anyone could want). */
  async close(): Promise<void> {
    this.abort.abort();
    clearTimeout(this.retryTimer);
    await this.loop;
    const all = [...this.ready.values()].flat();
    this.ready.clear();
    await Promise.all(all.map((p) => this.end(p)));
  }

  private schedule(): void {
    if (this.abort.signal.aborted) return;
    if (this.loop) {
      this.again = true;
      return;
    }
    this.loop = this.fill().finally(() => {
      this.loop = undefined;
      if (this.again) {
        this.again = false;
        this.schedule();
      }
    });
  }

  /** Fills one VM at a time (VMs booting side by side would slow each other and the user's). */
  private async fill(): Promise<void> {
    for (;;) {
      if (this.abort.signal.aborted) return;
      const next = await this.nextToFill();
      if (!next) return;
      this.filling = { key: next.key, memoryMiB: next.shape.memoryMiB };
      try {
        await this.fillOne(next.key, next.shape);
      } catch (err) {
        if (this.abort.signal.aborted) return;
        this.o.log.warn(`warm pool: a VM was not made ready: ${(err as Error).message}; trying again in ${RETRY_MS / 1000} s`);
        clearTimeout(this.retryTimer);
        this.retryTimer = setTimeout(() => this.schedule(), RETRY_MS);
        this.retryTimer.unref();
        return;
      } finally {
        this.filling = undefined;
      }
    }
  }

  /** Which shape needs a VM next (the default shape first), within the memory budget. */
  private async nextToFill(): Promise<{ key: string; shape: MachineShape } | undefined> {
    const def = await this.o.defaultShape().catch(() => undefined);
    const defKey = def ? this.o.templates.key(def) : undefined;
    for (const [key, w] of this.wanted) {
      // The default shape's artifacts changed (a new kernel, say), or a shape nobody asked for lately.
      const stale = w.isDefault ? key !== defKey : Date.now() - w.lastAskedMs > SHAPE_KEEP_MS;
      if (stale && key !== defKey) this.drop(key);
    }
    if (def && defKey) {
      const w = this.wanted.get(defKey);
      if (w) w.isDefault = true;
      else this.wanted.set(defKey, { shape: def, lastAskedMs: 0, isDefault: true });
    }
    let used = 0;
    for (const list of this.ready.values()) for (const p of list) used += p.memoryMiB;
    const order = [...this.wanted.entries()].sort(
      ([, a], [, b]) => Number(b.isDefault) - Number(a.isDefault) || b.lastAskedMs - a.lastAskedMs,
    );
    for (const [key, w] of order) {
      const list = this.ready.get(key) ?? [];
      for (const p of list.filter((p) => !this.o.templates.isCurrent(p.template))) {
        list.splice(list.indexOf(p), 1);
        used -= p.memoryMiB;
        void this.end(p);
      }
      if (list.length < this.o.size && used + w.shape.memoryMiB <= this.o.memoryBudgetMiB) return { key, shape: w.shape };
    }
    return undefined;
  }

  private drop(key: string): void {
    this.wanted.delete(key);
    for (const p of this.ready.get(key) ?? []) void this.end(p);
    this.ready.delete(key);
  }

  private async fillOne(key: string, shape: MachineShape): Promise<void> {
    const signal = this.abort.signal;
    await this.o.templates.ensure(shape);
    const template = this.o.templates.lookup(shape);
    if (!template) throw new AegisError('UNAVAILABLE', 'no template for this shape (yet)');
    const t0 = Date.now();
    const id = randomBytes(8).toString('hex');
    const dir = path.join(this.o.instancesDir, id);
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    let vm: Vm | undefined;
    let agent: AgentConnection | undefined;
    try {
      vm = await startVm(this.o, { id, handle: 'pool', dir, shape, template }, signal);
      const execs = new Map<string, () => void>();
      agent = new AgentConnection(
        await vm.connectAgent(signal),
        (event, params) => {
          if (event === 'execExit') execs.get((params as { execId: string }).execId)?.();
        },
        (err) => this.o.log.warn(`warm pool: VM ${id}: bad message from guest: ${err.message}`),
      );
      await agent.waitReady(this.o.bootTimeoutMs, signal);
      const restoredMs = Date.now() - t0;
      await this.warmUp(agent, execs, shape, signal);
      await vm.pause();
      const p: PooledVm = { id, vm, agent, template, key, memoryMiB: shape.memoryMiB, taken: false };
      void vm.exited.then(() => this.onExit(p));
      if (signal.aborted) throw signal.reason;
      const list = this.ready.get(key) ?? [];
      list.push(p);
      this.ready.set(key, list);
      this.o.log.info(`warm pool: VM ${id} ready (restored ${restoredMs} ms, warmed ${Date.now() - t0 - restoredMs} ms)`);
    } catch (err) {
      agent?.close();
      await vm?.stop({ timeoutMs: 0 }).catch(() => undefined);
      await fs.rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /**
   * Runs what every instance will: `fresh`, a command with output, and one without, through
   * the harness, the kernel's fork and exec, and the shell. Nothing is left behind: the
   * commands write no file and leave no process, and `fresh` runs again when the VM is taken.
   */
  private async warmUp(agent: AgentConnection, execs: Map<string, () => void>, shape: MachineShape, signal: AbortSignal): Promise<void> {
    const opts = { timeoutMs: WARM_UP_TIMEOUT_MS, signal };
    await agent.call('fresh', freshIdentity('aegis'), opts);
    for (const command of [['sh', '-c', 'echo warm'], ['true']]) {
      const execId = `warm-${randomBytes(4).toString('hex')}`;
      const exited = new Promise<void>((resolve) => execs.set(execId, resolve));
      const params: ExecParams = { execId, command, env: {}, ...(shape.imageDiskPath ? { image: {} } : {}) };
      await agent.call('exec', params, opts);
      await Promise.race([
        exited,
        new Promise((_, reject) =>
          setTimeout(() => reject(new AegisError('TIMEOUT', 'warm-up command did not exit')), WARM_UP_TIMEOUT_MS).unref(),
        ),
      ]);
      execs.delete(execId);
    }
  }

  /** A pooled VM that ended by itself (killed, crashed) is no longer ready. */
  private onExit(p: PooledVm): void {
    if (p.taken || this.ending.has(p)) return;
    const list = this.ready.get(p.key);
    const at = list?.indexOf(p) ?? -1;
    if (list && at >= 0) list.splice(at, 1);
    void fs.rm(path.join(this.o.instancesDir, p.id), { recursive: true, force: true });
    if (!this.abort.signal.aborted) {
      this.o.log.warn(`warm pool: VM ${p.id} ended while waiting`);
      this.schedule();
    }
  }

  private async end(p: PooledVm): Promise<void> {
    this.ending.add(p);
    p.agent.close();
    await p.vm.stop({ timeoutMs: 0 }).catch(() => undefined);
    await fs.rm(path.join(this.o.instancesDir, p.id), { recursive: true, force: true });
  }
}
