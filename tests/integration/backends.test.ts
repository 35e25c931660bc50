/**
 * The shared VMM backend suite: every backend in the registry (@aegis/backends, plus the
 * libkrun-shaped test backend this file registers) runs the same tests against the same
 * contract (packages/vmm/src/vmm.ts, docs/backends.md). What a backend's capabilities rule out
 * is skipped with the capability named, and a backend whose hypervisor is missing here is
 * skipped with the reason, never counted as passed; each backend ends with one line of what
 * ran and what was skipped.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it, type TestContext } from 'vitest';
import { AegisError, RpcPeer, parseResult, type HealthResult } from '@aegis/protocol';
import type { Backend, Capabilities, Vm, VmConfig } from '@aegis/vmm';
import { MISSING_BACKENDS, backendEntries, registerBackend } from '@aegis/backends';
import { backends as launcherBackends } from '../support/launcher-vmm.js';
import { artifacts } from './fixture.js';

for (const entry of launcherBackends) registerBackend(entry);

interface Candidate {
  name: string;
  backend?: Backend;
  /** Why this backend cannot run here at all. */
  missing?: string;
}

const candidates: Candidate[] = [
  ...(await backendEntries()).map((e) => ({ name: e.name, backend: e.create({}) })),
  ...MISSING_BACKENDS.map((m) => ({ name: m.name, missing: m.missing })),
];

/** A JSON-RPC client over a VM's agent channel, enough to drive the harness. */
function agentClient(stream: Duplex): { health(timeoutMs: number): Promise<HealthResult>; peer: RpcPeer; stream: Duplex } {
  const peer = new RpcPeer({ send: (l) => void stream.write(l) });
  stream.on('data', (c: Buffer) => peer.receive(c));
  stream.on('close', () => peer.close(new AegisError('UNAVAILABLE', 'closed')));
  return {
    peer,
    stream,
    health: async (timeoutMs) => parseResult.health(await peer.request('health', {}, { timeoutMs })),
  };
}

async function untilHealthy(stream: Duplex, timeoutMs: number): Promise<ReturnType<typeof agentClient>> {
  const client = agentClient(stream);
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await client.health(300);
      return client;
    } catch (err) {
      if (Date.now() > deadline) throw err;
    }
  }
}

for (const c of candidates) {
  describe(`VMM backend ${c.name}`, () => {
    let skipReason = c.missing;
    let caps: Capabilities | undefined;
    let dir = '';
    let n = 0;
    const ran: string[] = [];
    const skipped: string[] = [];

    beforeAll(async () => {
      if (c.backend && !skipReason) {
        const probe = await c.backend.probe();
        if (!probe.available) skipReason = probe.detail;
        caps = probe.capabilities;
      }
      process.stdout.write(`backend ${c.name}: ${skipReason ? `SKIPPED (${skipReason})` : 'running the shared suite'}\n`);
      dir = mkdtempSync('/tmp/aegis-vmm-');
    });
    afterAll(async () => {
      // A test that failed half-way may have left a VM: none may outlive the suite.
      for (const stray of (await c.backend?.strays(dir, []).catch(() => [])) ?? []) stray.end();
      rmSync(dir, { recursive: true, force: true });
      const list = (xs: string[]): string => (xs.length ? xs.map((x) => `\n    - ${x}`).join('') : ' none');
      process.stdout.write(
        skipReason
          ? `backend ${c.name}: ran none, skipped all ${skipped.length} (${skipReason})\n`
          : `backend ${c.name}: ran ${ran.length}:${list(ran)}\n  skipped ${skipped.length}:${list(skipped)}\n`,
      );
    });

    /**
     * Runs the test only when the backend is here and `needs` (capabilities) allows it; else
     * skips it, saying why, and notes which.
     */
    function allowed(ctx: TestContext, needs?: { when: (c: Capabilities) => boolean; because: string }): boolean {
      const name = ctx.task.name;
      const why = skipReason ?? (needs && caps && !needs.when(caps) ? needs.because : undefined);
      if (why) {
        skipped.push(skipReason ? name : `${name} (${why})`);
        ctx.skip(why);
        return false;
      }
      ran.push(name);
      return true;
    }

    function config(over: Partial<VmConfig> = {}): VmConfig {
      const id = `suite-${c.name}-${process.pid}-${n++}`;
      const stateDir = path.join(dir, id);
      execFileSync('mkdir', ['-p', stateDir]);
      const scratch = path.join(stateDir, 'scratch.img');
      writeFileSync(scratch, '');
      execFileSync('truncate', ['-s', '256M', scratch]);
      execFileSync('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', scratch]);
      const a = artifacts();
      return {
        id,
        stateDir,
        kernelPath: a.kernel,
        rootfsPath: a.rootfs,
        scratchDiskPath: scratch,
        memoryMiB: 512,
        vcpuCount: 1,
        network: 'none',
        kernelArgs: [],
        ...over,
      };
    }

    function backend(): Backend {
      if (!c.backend) throw new Error('no backend');
      return c.backend;
    }

    async function boot(cfg = config()): Promise<{ vm: Vm; agent: ReturnType<typeof agentClient> }> {
      const vm = await backend().create(cfg);
      await vm.start();
      const agent = await untilHealthy(await vm.connectAgent(), 60_000);
      return { vm, agent };
    }

    const canPause = { when: (k: Capabilities) => k.pause, because: 'capabilities.pause is false' };
    const survives = { when: (k: Capabilities) => k.survivesDaemonRestart, because: 'capabilities.survivesDaemonRestart is false' };
    const warm = {
      when: (k: Capabilities) => k.snapshot && k.diskClones,
      because: 'capabilities.snapshot or capabilities.diskClones is false',
    };
    const lacksSome = {
      when: (k: Capabilities) => !k.snapshot || !k.diskClones || !k.pause,
      because: 'it has every optional capability (pause, snapshot, diskClones)',
    };

    it('probes available and states its capabilities as data', async (ctx) => {
      if (!allowed(ctx)) return;
      const probe = await backend().probe();
      expect(probe.available).toBe(true);
      expect(probe.capabilities).toMatchObject({
        pause: expect.any(Boolean),
        snapshot: expect.any(Boolean),
        diskClones: expect.any(Boolean),
        agentTransport: expect.any(String),
        networkModes: expect.arrayContaining(['none']),
      });
    });

    it('boots a VM whose harness answers on the agent channel, and stops it', async (ctx) => {
      if (!allowed(ctx)) return;
      const { vm, agent } = await boot();
      const h = await agent.health(5000);
      expect(h.version).toBe(1);
      expect(h.workload).toBeNull();
      await vm.stop({ timeoutMs: 2000 });
      expect((await vm.exited).reason).toBe('host-stop');
    });

    it('pauses guest execution and resumes it', async (ctx) => {
      if (!allowed(ctx, canPause)) return;
      const { vm, agent } = await boot();
      try {
        await vm.pause();
        await expect(agent.health(1000)).rejects.toMatchObject({ code: 'TIMEOUT' });
        await vm.resume();
        expect((await agent.health(10_000)).version).toBe(1);
      } finally {
        await vm.stop({ timeoutMs: 1000 });
      }
    });

    it('ends the VMM process when the guest powers off', async (ctx) => {
      if (!allowed(ctx)) return;
      const { vm, agent } = await boot();
      await agent.peer.request('shutdown', {}, { timeoutMs: 10_000 });
      const exit = await Promise.race([vm.exited, new Promise((r) => setTimeout(() => r('still running'), 15_000))]);
      expect(exit).toMatchObject({ reason: 'guest-poweroff' });
    });

    it('finds a running VM again from its record, and reports a gone one as NOT_FOUND', async (ctx) => {
      if (!allowed(ctx, survives)) return;
      const { vm, agent } = await boot();
      // The channel has one host end at a time, as the QMP socket has: let go of both.
      agent.stream.destroy();
      const record = vm.record();
      vm.detach();
      const again = await backend().attach(record);
      const agent2 = await untilHealthy(await again.connectAgent(), 10_000);
      expect((await agent2.health(5000)).version).toBe(1);
      await again.stop({ timeoutMs: 1000 });
      await again.exited;
      await expect(backend().attach(record)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    });

    it('stop after detach returns and the VMM process is gone (it used to wait forever)', async (ctx) => {
      if (!allowed(ctx, survives)) return;
      const { vm, agent } = await boot();
      agent.stream.destroy();
      const pid = vm.hostPid();
      vm.detach();
      const stopped = await Promise.race([
        vm.stop({ timeoutMs: 2000 }).then(() => 'returned'),
        new Promise((r) => setTimeout(() => r('still waiting'), 15_000)),
      ]);
      expect(stopped).toBe('returned');
      expect(pid).toBeGreaterThan(0);
      expect(() => process.kill(pid ?? 0, 0)).toThrow();
    });

    it("lists a VM's processes as strays of its directory until its record is kept, and ends them", async (ctx) => {
      if (!allowed(ctx)) return;
      const cfg = config();
      const { vm, agent } = await boot(cfg);
      agent.stream.destroy();
      const owner = path.basename(cfg.stateDir);
      const strays = await backend().strays(dir, []);
      expect(strays.filter((s) => s.owner === owner).map((s) => s.pid)).toContain(vm.hostPid());
      expect((await backend().strays(dir, [vm.record()])).filter((s) => s.owner === owner)).toEqual([]);
      for (const s of strays) s.end();
      const exit = await Promise.race([vm.exited, new Promise((r) => setTimeout(() => r('still running'), 10_000))]);
      expect(exit).toMatchObject({ reason: 'killed' });
    });

    it("restores a snapshot on a clone of the snapshotted VM's disk, RAM mapped from the template", async (ctx) => {
      if (!allowed(ctx, warm)) return;
      const template = config();
      const memory = path.join(template.stateDir, 'memory');
      const snapshot = path.join(template.stateDir, 'snapshot.bin');
      const { vm, agent } = await boot({ ...template, snapshotMemory: { path: memory, access: 'write' } });
      agent.stream.destroy();
      await vm.saveSnapshot?.(snapshot);
      await vm.stop({ timeoutMs: 1000 });
      const clone = config();
      const disk = path.join(clone.stateDir, 'scratch.clone');
      await backend().cloneDisk?.(template.scratchDiskPath, disk);
      const restored = await boot({
        ...clone,
        scratchDiskPath: disk,
        scratchDiskCloned: true,
        restoreFrom: snapshot,
        snapshotMemory: { path: memory, access: 'map' },
      });
      try {
        expect((await restored.agent.health(10_000)).version).toBe(1);
      } finally {
        await restored.vm.stop({ timeoutMs: 1000 });
      }
    });

    const checkpoints = {
      when: (k: Capabilities) => k.snapshot && backend().copyDisk !== undefined,
      because: 'capabilities.snapshot is false or the backend has no copyDisk',
    };

    it("checkpoints a running VM (its state, and copyDisk's standalone copy of its disk) and restores both into another VM", async (ctx) => {
      if (!allowed(ctx, checkpoints)) return;
      const source = config();
      const { vm, agent } = await boot(source);
      agent.stream.destroy();
      const state = path.join(source.stateDir, 'checkpoint', 'state');
      execFileSync('mkdir', ['-p', path.dirname(state)]);
      try {
        await vm.saveSnapshot?.(state);
        await backend().copyDisk?.(source.scratchDiskPath, false, path.join(source.stateDir, 'checkpoint', 'disk'));
        await vm.resume();
        expect((await untilHealthy(await vm.connectAgent(), 30_000).then((a) => a.health(10_000))).version).toBe(1);
      } finally {
        await vm.stop({ timeoutMs: 1000 });
      }
      const target = config();
      const disk = path.join(target.stateDir, 'disk');
      execFileSync('cp', ['--sparse=always', path.join(source.stateDir, 'checkpoint', 'disk'), disk]);
      execFileSync('cmp', [source.scratchDiskPath, disk]);
      const restored = await boot({ ...target, scratchDiskPath: disk, restoreFrom: state });
      try {
        expect((await restored.agent.health(10_000)).version).toBe(1);
      } finally {
        await restored.vm.stop({ timeoutMs: 1000 });
      }
    });

    it('refuses what its capabilities leave out with UNSUPPORTED, before booting anything', async (ctx) => {
      if (!allowed(ctx, lacksSome)) return;
      const k = caps as Capabilities;
      if (!k.snapshot) {
        await expect(backend().create(config({ restoreFrom: path.join(dir, 'no-snapshot') }))).rejects.toMatchObject({
          code: 'UNSUPPORTED',
        });
      }
      if (!k.diskClones) {
        expect(backend().cloneDisk).toBeUndefined();
        await expect(backend().create(config({ scratchDiskCloned: true }))).rejects.toMatchObject({ code: 'UNSUPPORTED' });
      }
      const vm = await backend().create(config());
      if (!k.snapshot) expect(vm.saveSnapshot).toBeUndefined();
      if (!k.pause) await expect(vm.pause()).rejects.toMatchObject({ code: 'UNSUPPORTED' });
    });
  });
}
