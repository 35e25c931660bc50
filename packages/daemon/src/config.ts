import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import { parseDurationMs } from '@aegis/protocol';
import { checkIdlePauseMs } from './instances/idle.js';

export interface DaemonConfig {
  home: string;
  socketPath: string;
  dbPath: string;
  instancesDir: string;
  kernelPath: string;
  rootfsPath: string;
  /** Backend to prefer (AEGIS_BACKEND); otherwise the first usable one. */
  backend: string | undefined;
  defaultMemoryMiB: number;
  defaultVcpuCount: number;
  /** Size of each instance's sparse scratch disk (its writable layer). */
  scratchDiskMiB: number;
  /** How long a boot may take before the instance fails (TCG boots take seconds). */
  bootTimeoutMs: number;
  /** Restore instances from snapshot templates instead of booting (AEGIS_WARM_BOOT=0 turns it off). */
  warmBoot: boolean;
  /** Where templates live (AEGIS_TEMPLATES); default: beside the guest artifacts. */
  templatesDir: string | undefined;
  /** Run time given to an instance created without `timeoutMs` (AEGIS_DEFAULT_TIMEOUT_MS); 0: none. */
  defaultTimeoutMs: number;
  /** Paused VMs kept ready per machine shape (AEGIS_POOL_SIZE, default 2; 0 turns the pool off). Needs warm boot. */
  poolSize: number;
  /** Guest memory the whole pool may hold (AEGIS_POOL_MEMORY_MIB, default 2048). */
  poolMemoryMiB: number;
  /** Idle time after which an instance created without `idlePauseMs` is paused (AEGIS_IDLE_PAUSE, a duration); 0: never. */
  defaultIdlePauseMs: number;
  /** Registries reached over plain http (AEGIS_INSECURE_REGISTRIES, comma-separated host[:port]); loopback always is. */
  insecureRegistries: string[];
  /** Serve E2B's API on this loopback `HOST:PORT` too (AEGIS_E2B_ADDR, `aegis up --e2b`); off when unset. */
  e2bAddr: string | undefined;
  /** Serve the dashboard on this loopback `HOST:PORT` (AEGIS_UI_ADDR, `aegis up --ui`); off when unset. */
  uiAddr: string | undefined;
}

export function aegisHome(env: NodeJS.ProcessEnv = process.env): string {
  return env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis');
}

export function loadConfig(env: NodeJS.ProcessEnv = process.env): DaemonConfig {
  const home = aegisHome(env);
  const cache = path.join(home, 'cache');
  return {
    home,
    socketPath: path.join(home, 'aegisd.sock'),
    dbPath: path.join(home, 'aegis.db'),
    instancesDir: path.join(home, 'instances'),
    kernelPath: env['AEGIS_KERNEL'] ?? path.join(cache, 'kernel', 'vmlinux'),
    rootfsPath: env['AEGIS_ROOTFS'] ?? path.join(cache, 'rootfs', 'base.erofs'),
    backend: env['AEGIS_BACKEND'],
    defaultMemoryMiB: 512,
    defaultVcpuCount: 1,
    scratchDiskMiB: 4096,
    bootTimeoutMs: Number(env['AEGIS_BOOT_TIMEOUT_MS'] ?? 60_000),
    warmBoot: env['AEGIS_WARM_BOOT'] !== '0',
    defaultTimeoutMs: Number(env['AEGIS_DEFAULT_TIMEOUT_MS'] ?? 0),
    defaultIdlePauseMs: idlePauseSetting(env['AEGIS_IDLE_PAUSE']),
    templatesDir: env['AEGIS_TEMPLATES'],
    poolSize: countFrom(env, 'AEGIS_POOL_SIZE', 2),
    poolMemoryMiB: countFrom(env, 'AEGIS_POOL_MEMORY_MIB', 2048),
    insecureRegistries: (env['AEGIS_INSECURE_REGISTRIES'] ?? '')
      .split(',')
      .map((h) => h.trim())
      .filter(Boolean),
    e2bAddr: env['AEGIS_E2B_ADDR'] || undefined,
    uiAddr: env['AEGIS_UI_ADDR'] || undefined,
  };
}

/** A whole number ≥ 0 from the environment, or `fallback` when unset. */
function countFrom(env: NodeJS.ProcessEnv, name: string, fallback: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  if (!/^\d{1,9}$/.test(raw.trim())) throw new AegisError('INVALID_ARGUMENT', `${name} must be a whole number ≥ 0, not "${raw}"`);
  return Number(raw.trim());
}

/** AEGIS_IDLE_PAUSE: off unless set; a bad value stops aegisd from starting, with the reason. */
function idlePauseSetting(v: string | undefined): number {
  if (v === undefined || v.trim() === '') return 0;
  const ms = parseDurationMs(v, 'AEGIS_IDLE_PAUSE');
  checkIdlePauseMs(ms, 'AEGIS_IDLE_PAUSE');
  return ms;
}

/**
 * Creates AEGIS_HOME and its instances directory private to the daemon's user (0700), and
 * tightens them when they already exist with wider modes: the registry, the secrets key and
 * every instance's files live under them. A shared sticky directory such as /tmp is refused,
 * not chmodded.
 */
export async function makePrivateDirs(config: Pick<DaemonConfig, 'home' | 'instancesDir'>): Promise<void> {
  for (const dir of [config.home, config.instancesDir]) {
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    const st = await fs.stat(dir);
    if (!st.isDirectory()) throw new AegisError('FAILED_PRECONDITION', `${dir} is not a directory`);
    if ((st.mode & 0o1000) !== 0) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `${dir} is a shared directory (sticky bit, like /tmp); point AEGIS_HOME at a directory of its own`,
      );
    }
    if ((st.mode & 0o777) === 0o700) continue;
    try {
      await fs.chmod(dir, 0o700);
    } catch (err) {
      throw new AegisError('FAILED_PRECONDITION', `cannot make ${dir} private (chmod 700): ${(err as Error).message}`, { cause: err });
    }
  }
}
