/**
 * The shared VMM backend suite: every backend runs the same tests against the same contract
 * (packages/vmm/src/vmm.ts, docs/backends.md). A backend whose hypervisor is missing here is
 * reported as skipped with the reason, never counted as passed.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AegisError, RpcPeer, parseResult, type HealthResult } from '@aegis/protocol';
import type { Backend, Vm, VmConfig } from '@aegis/vmm';
import { QemuBackend } from '@aegis/vmm-qemu';
import { FirecrackerBackend } from '@aegis/vmm-firecracker';
import { artifacts, qemuProcessesFor } from './fixture.js';

interface Candidate {
  name: string;
  backend?: Backend;
  /** Why this backend cannot run here at all. */
  missing?: string;
}

const candidates: Candidate[] = [
  { name: 'qemu', backend: new QemuBackend() },
  { name: 'firecracker', backend: new FirecrackerBackend() },
  { name: 'libkrun', missing: 'not implemented yet: needs macOS Hypervisor.framework (or /dev/kvm)' },
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
    let dir = '';
    let n = 0;

    beforeAll(async () => {
      if (c.backend && !skipReason) {
        const probe = await c.backend.probe();
        if (!probe.available) skipReason = probe.detail;
      }
      process.stdout.write(`backend ${c.name}: ${skipReason ? `SKIPPED (${skipReason})` : 'running the shared suite'}\n`);
      dir = mkdtempSync('/tmp/aegis-vmm-');
    });
    afterAll(async () => {
      // A test that failed half-way may have left a VM: none may outlive the suite.
      for (const line of await qemuProcessesFor(dir)) process.kill(Number(line.trim().split(/\s+/)[0]), 'SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    });

    function config(): VmConfig {
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
      };
    }

    async function boot(): Promise<{ vm: Vm; agent: ReturnType<typeof agentClient> }> {
      const backend = c.backend;
      if (!backend) throw new Error('no backend');
      const vm = await backend.create(config());
      await vm.start();
      const agent = await untilHealthy(await vm.connectAgent(), 60_000);
      return { vm, agent };
    }

    it('probes available and states its capabilities as data', async (ctx) => {
      if (skipReason) return ctx.skip(skipReason);
      const probe = await c.backend?.probe();
      expect(probe?.available).toBe(true);
      expect(probe?.capabilities).toMatchObject({
        pause: expect.any(Boolean),
        agentTransport: expect.any(String),
        networkModes: expect.arrayContaining(['none']),
      });
    });

    it('boots a VM whose harness answers on the agent channel, and stops it', async (ctx) => {
      if (skipReason) return ctx.skip(skipReason);
      const { vm, agent } = await boot();
      const h = await agent.health(5000);
      expect(h.version).toBe(1);
      expect(h.workload).toBeNull();
      await vm.stop({ timeoutMs: 2000 });
      expect((await vm.exited).reason).toBe('host-stop');
    });

    it('pauses guest execution and resumes it', async (ctx) => {
      if (skipReason) return ctx.skip(skipReason);
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
      if (skipReason) return ctx.skip(skipReason);
      const { vm, agent } = await boot();
      await agent.peer.request('shutdown', {}, { timeoutMs: 10_000 });
      const exit = await Promise.race([vm.exited, new Promise((r) => setTimeout(() => r('still running'), 15_000))]);
      expect(exit).toMatchObject({ reason: 'guest-poweroff' });
    });

    it('finds a running VM again from its record, and reports a gone one as NOT_FOUND', async (ctx) => {
      if (skipReason) return ctx.skip(skipReason);
      const backend = c.backend;
      if (!backend) return;
      const { vm, agent } = await boot();
      // The channel has one host end at a time, as the QMP socket has: let go of both.
      agent.stream.destroy();
      const record = vm.record();
      vm.detach();
      const again = await backend.attach(record);
      const agent2 = await untilHealthy(await again.connectAgent(), 10_000);
      expect((await agent2.health(5000)).version).toBe(1);
      await again.stop({ timeoutMs: 1000 });
      await again.exited;
      await expect(backend.attach(record)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    });

    it('stop after detach returns and the VMM process is gone (it used to wait forever)', async (ctx) => {
      if (skipReason) return ctx.skip(skipReason);
      const { vm, agent } = await boot();
      agent.stream.destroy();
      const pid = (vm.record() as { pid?: number }).pid;
      vm.detach();
      const stopped = await Promise.race([
        vm.stop({ timeoutMs: 2000 }).then(() => 'returned'),
        new Promise((r) => setTimeout(() => r('still waiting'), 15_000)),
      ]);
      expect(stopped).toBe('returned');
      expect(pid).toBeGreaterThan(0);
      expect(() => process.kill(pid ?? 0, 0)).toThrow();
    });
  });
}
