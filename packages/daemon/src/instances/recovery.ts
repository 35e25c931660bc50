/**
 * After a daemon restart (or crash), once each instance has taken over or settled its own VM
 * (Instance.recover): any VMM process started for an instance of this home that is not a
 * listed live instance's own VM (a start whose record was never written, a row deleted under a
 * running VM) is ended.
 */
import { promises as fs } from 'node:fs';
import type { Logger } from '../log.js';
import type { Registry } from '../registry/db.js';
import { isLive } from './state.js';

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

/** Ends VMM processes of this home that no live instance owns. */
export async function endStrays(ctx: { registry: Registry; instancesDir: string; log: Logger }): Promise<number> {
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
