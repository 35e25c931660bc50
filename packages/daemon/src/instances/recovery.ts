/**
 * After a daemon restart (or crash): make the registry and the machine agree. Instances whose
 * VM still runs are taken over; those caught half-way (`starting`, `stopping`) are settled; and
 * any process the backend started for an instance of this home that is not a listed live
 * instance's own VM (a start whose record was never written, a row deleted under a running VM,
 * a pooled VM) is ended.
 */
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

/**
 * Ends the processes the backend started for VMs under the instances directory that no live
 * instance owns (the backend knows its own processes and reads its own records).
 */
export async function endStrays(ctx: Pick<RecoveryContext, 'registry' | 'backend' | 'instancesDir' | 'log'>): Promise<number> {
  const keep = ctx.registry.listInstances().flatMap((row) => (isLive(row.state) && row.vmRecord ? [row.vmRecord] : []));
  let ended = 0;
  for (const stray of await ctx.backend.strays(ctx.instancesDir, keep)) {
    if (!stray.end()) continue; // gone meanwhile
    ended++;
    ctx.log.warn(`ended a ${stray.what} process (pid ${stray.pid}) of instance ${stray.owner}, which no live instance owns`);
  }
  return ended;
}
