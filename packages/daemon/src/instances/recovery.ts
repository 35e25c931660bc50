/**
 * After a daemon restart (or crash), once each instance has taken over or settled its own VM
 * (Instance.recover): any process the backend started for an instance of this home that is not
 * a listed live instance's own VM (a start whose record was never written, a row deleted under
 * a running VM, a pooled VM) is ended.
 */
import type { Backend } from '@aegis/vmm';
import type { Logger } from '../log.js';
import type { Registry } from '../registry/db.js';
import { isLive } from './state.js';

/**
 * Ends the processes the backend started for VMs under the instances directory that no live
 * instance owns (the backend knows its own processes and reads its own records).
 */
export async function endStrays(ctx: { registry: Registry; backend: Backend; instancesDir: string; log: Logger }): Promise<number> {
  const keep = ctx.registry.listInstances().flatMap((row) => (isLive(row.state) && row.vmRecord ? [row.vmRecord] : []));
  let ended = 0;
  for (const stray of await ctx.backend.strays(ctx.instancesDir, keep)) {
    if (!stray.end()) continue; // gone meanwhile
    ended++;
    ctx.log.warn(`ended a ${stray.what} process (pid ${stray.pid}) of instance ${stray.owner}, which no live instance owns`);
  }
  return ended;
}
