/**
 * After a daemon restart (or crash): make the registry and the machine agree. Instances whose
 * VM still runs are taken over; those caught half-way (`starting`, `stopping`) are settled; and
 * any VMM process started for an instance of this home that is not a listed live instance's
 * own VM (a start whose record was never written, a row deleted under a running VM) is ended.
 */
import { promises as fs } from 'node:fs';
import type { Backend, Vm } from '@aegis/vmm';
import type { Logger } from '../log.js';
import type { InstanceRow, Registry } from '../registry/db.js';
import { isLive } from './state.js';

export interface RecoveryContext {
  registry: Registry;
  backend: Backend;
  log: Logger;
  instancesDir: string;
  /** Moves a row; false when the state table or a concurrent change refuses it. */
  move(id: string, to: InstanceRow['state'], patch: Parameters<Registry['updateInstance']>[1]): boolean;
  /** Takes over a VM found running for a live instance. */
  adopt(row: InstanceRow, vm: Vm): Promise<void>;
}

/** VMM processes whose command line names a directory under `instancesDir`: pid → instance id. */
export async function vmmProcessesUnder(instancesDir: string): Promise<Map<number, string>> {
  const found = new Map<number, string>();
  const prefix = `${instancesDir}/`;
  for (const name of await fs.readdir('/proc').catch(() => [] as string[])) {
    const pid = Number(name);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '');
    const at = cmdline.indexOf(prefix);
    if (at < 0) continue;
    const argv0 = cmdline.split('\0')[0] ?? '';
    if (!/qemu-system|firecracker|krun|passt/.test(argv0)) continue;
    const id = cmdline.slice(at + prefix.length).split(/[/\0,]/)[0];
    if (id && /^[0-9a-f]{16}$/.test(id)) found.set(pid, id);
  }
  return found;
}

function pidOf(record: unknown): number | undefined {
  const pid = (record as { pid?: unknown } | null)?.pid;
  return typeof pid === 'number' ? pid : undefined;
}

export async function recover(ctx: RecoveryContext): Promise<void> {
  for (const row of ctx.registry.listInstances()) {
    if (!isLive(row.state)) continue;
    if (!row.vmRecord || row.state === 'starting') {
      // A start is never resumed: its caller has gone. Whatever it booted is ended below.
      if (row.vmRecord) {
        const vm = await ctx.backend.attach(row.vmRecord).catch(() => undefined);
        await vm?.stop({ timeoutMs: 1000 }).catch(() => undefined);
      }
      ctx.move(row.id, 'failed', { stateReason: 'aegisd stopped while the instance was starting', stoppedAt: Date.now(), vmRecord: null });
      continue;
    }
    let vm: Vm;
    try {
      vm = await ctx.backend.attach(row.vmRecord);
    } catch (err) {
      const clean = row.state === 'stopping' || row.exitCode !== null;
      ctx.move(row.id, clean ? 'stopped' : 'failed', {
        stateReason: `VM ended while aegisd was not running (${(err as Error).message})`,
        stoppedAt: Date.now(),
        vmRecord: null,
      });
      continue;
    }
    await ctx.adopt(row, vm);
  }
  await endStrays(ctx);
}

/** Ends VMM processes of this home that no live instance owns. */
async function endStrays(ctx: Pick<RecoveryContext, 'registry' | 'instancesDir' | 'log'>): Promise<number> {
  const owned = new Map<string, number | undefined>();
  for (const row of ctx.registry.listInstances()) {
    if (isLive(row.state) && row.vmRecord) owned.set(row.id, pidOf(row.vmRecord));
  }
  let ended = 0;
  for (const [pid, id] of await vmmProcessesUnder(ctx.instancesDir)) {
    const own = owned.get(id);
    // passt has its own pid: it belongs with its instance's VM, and exits with it.
    if (owned.has(id) && (own === pid || own === undefined || !(await isVmm(pid)))) continue;
    try {
      process.kill(pid, 'SIGKILL');
      ended++;
      ctx.log.warn(`ended a VMM process (pid ${pid}) of instance ${id}, which no live instance owns`);
    } catch {
      // gone meanwhile
    }
  }
  return ended;
}

async function isVmm(pid: number): Promise<boolean> {
  const argv0 = (await fs.readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0')[0] ?? '';
  return !argv0.includes('passt');
}
