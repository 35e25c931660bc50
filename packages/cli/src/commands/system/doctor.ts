import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, realpathSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { isAegisError, type Status } from '@aegis/client';
import type { Probe } from '@aegis/vmm';
import { client, exit } from '../../util.js';

/**
 * `ok`: works. `warn`: works, but degraded (TCG instead of KVM) or an optional part is unusable
 * (another backend, passt, the daemon not started yet). `missing`: something Aegis needs is
 * absent; doctor exits 1.
 */
export type CheckStatus = 'ok' | 'warn' | 'missing';

export interface Check {
  name: string;
  status: CheckStatus;
  detail: string;
}

function fileCheck(name: string, file: string, hint: string): Check {
  try {
    accessSync(file, constants.R_OK);
    return { name, status: 'ok', detail: file };
  } catch {
    return { name, status: 'missing', detail: `${file} missing; ${hint}` };
  }
}

function toolCheck(name: string, args: string[], ifAbsent: CheckStatus, hint: string): Check {
  // e2fsprogs print their version on stderr.
  const r = spawnSync(name, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
  if (r.error || r.status !== 0) return { name, status: ifAbsent, detail: `not found; ${hint}` };
  return { name, status: 'ok', detail: (r.stdout || r.stderr).split('\n')[0]?.trim() ?? '' };
}

/**
 * One line per backend, as the daemon would choose (@aegis/vmm selectBackend): the backend
 * AEGIS_BACKEND names is required; without it, any usable backend will do, and only when none
 * is usable is the first (the default) missing.
 */
export function backendChecks(probes: { name: string; probe: Probe }[], preferred?: string): Check[] {
  const anyUsable = probes.some((p) => p.probe.available);
  return probes.map(({ name, probe }, i): Check => {
    if (probe.available) return { name: `backend ${name}`, status: 'ok', detail: probe.detail };
    const required = preferred ? preferred === name : !anyUsable && i === 0;
    return { name: `backend ${name}`, status: required ? 'missing' : 'warn', detail: `not usable here: ${probe.detail}` };
  });
}

/** KVM is `ok`; TCG works, seconds per boot instead of milliseconds. */
export function accelerationCheck(probe: Probe): Check {
  if (probe.capabilities?.acceleration === 'kvm') return { name: 'acceleration', status: 'ok', detail: probe.accelerationReason ?? 'KVM' };
  return {
    name: 'acceleration',
    status: 'warn',
    detail: `${probe.accelerationReason ?? 'TCG'} (software emulation: VMs boot in seconds, not milliseconds)`,
  };
}

/** The daemon is not needed to run doctor: not started is a `warn`; one that answers wrongly is not. */
export function daemonCheck(status: { pid: number; backend: string } | Error): Check {
  if (!(status instanceof Error)) return { name: 'aegisd', status: 'ok', detail: `running (pid ${status.pid}), backend ${status.backend}` };
  if (isAegisError(status, 'UNAVAILABLE')) return { name: 'aegisd', status: 'warn', detail: 'not running (start it with: aegis up)' };
  return { name: 'aegisd', status: 'missing', detail: `not answering: ${status.message}` };
}

/** The warm pool, as the running daemon has it. */
export function poolCheck(pool: Status['pool']): Check {
  if (!pool)
    return {
      name: 'warm pool',
      status: 'warn',
      detail: 'off (AEGIS_POOL_SIZE=0, or warm boot off): instances start from a template or boot',
    };
  return {
    name: 'warm pool',
    status: 'ok',
    detail: `${pool.ready} VM(s) ready, ${pool.size} per shape, budget ${pool.memoryBudgetMiB} MiB`,
  };
}

/** One line per check: its status, its name, what was found or what to do. */
export function formatChecks(checks: Check[]): string {
  return checks.map((c) => `${c.status.padEnd(7)} ${c.name.padEnd(20)} ${c.detail}\n`).join('');
}

/** Checks this machine can run Aegis, without needing the daemon; says what to fix. */
export function doctorCommand(): Command {
  return new Command('doctor')
    .description('check that this machine can run Aegis VMs (ok, warn, or missing: exit status 1)')
    .option('--json', 'print JSON: an array of {name, status, detail}')
    .action(async (o: { json?: boolean }) => {
      // The backends are loaded here only: every other command starts without them.
      const { MISSING_BACKENDS, backendEntries } = await import('@aegis/backends');
      const home = process.env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis');
      const kernelPath = process.env['AEGIS_KERNEL'] ?? path.join(home, 'cache/kernel/vmlinux');
      const rootfsPath = process.env['AEGIS_ROOTFS'] ?? path.join(home, 'cache/rootfs/base.erofs');
      // The daemon's own choice: the same verdict cache, beside the guest artifacts.
      const artifacts = existsSync(rootfsPath) ? path.dirname(path.dirname(realpathSync(rootfsPath))) : path.join(home, 'cache');
      const opts = { cacheDir: artifacts, ...(existsSync(kernelPath) ? { kernelPath: realpathSync(kernelPath) } : {}) };
      // doctor waits for a KVM test the daemon would run in the background (a few seconds at most).
      const settle = async (p: Probe): Promise<Probe> => (p.settled ? await p.settled : p);
      const probes: { name: string; probe: Probe }[] = [];
      for (const entry of await backendEntries()) probes.push({ name: entry.name, probe: await settle(await entry.create(opts).probe()) });
      const preferred = process.env['AEGIS_BACKEND'];
      // What the daemon would pick: the backend named, else the first usable, else the first.
      const chosen = (preferred ? probes.find((p) => p.name === preferred) : probes.find((p) => p.probe.available)) ?? probes[0];
      const userNet = chosen?.probe.capabilities?.networkModes.includes('user') === true;
      const status = await client()
        .status()
        .catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
      const checks: Check[] = [
        ...backendChecks(probes, preferred),
        ...MISSING_BACKENDS.map((b): Check => ({ name: `backend ${b.name}`, status: 'warn', detail: b.missing })),
        ...(chosen ? [accelerationCheck(chosen.probe)] : []),
        toolCheck('mkfs.ext4', ['-V'], 'missing', 'apt-get install e2fsprogs'),
        // Images are prepared with mke2fs -d and debugfs; qemu-img makes warm instances' disks.
        toolCheck('debugfs', ['-V'], 'warn', '--image cannot prepare images (apt-get install e2fsprogs)'),
        toolCheck('qemu-img', ['--version'], 'missing', 'apt-get install qemu-utils'),
        {
          name: 'guest network',
          status: 'ok',
          detail:
            'user (default): TCP and DNS to public addresses, carried by aegisd under the egress policy; ' +
            (userNet ? 'unfiltered: passt' : 'unfiltered: unavailable (apt-get install passt)'),
        },
        fileCheck('guest kernel', kernelPath, 'build it with: make kernel'),
        fileCheck('base rootfs', rootfsPath, 'build it with: make base-rootfs'),
        daemonCheck(status instanceof Error ? status : { pid: status.pid, backend: status.backend.name }),
        ...(status instanceof Error ? [] : [poolCheck(status.pool)]),
      ];
      process.stdout.write(o.json ? JSON.stringify(checks, null, 2) + '\n' : formatChecks(checks));
      exit(checks.some((c) => c.status === 'missing') ? 1 : 0);
    });
}
