/**
 * `aegis stats`: what an instance costs the host (its VMM process's CPU and memory, its scratch
 * disk's allocated bytes) beside what its guest says it uses. Host figures come from /proc and
 * the disk file, never from the guest; the guest's own are parsed and bounded like everything
 * it sends.
 */
import { promises as fs } from 'node:fs';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { InstanceRow } from '../registry/db.js';
import { isIdlePaused } from './idle.js';

/** USER_HZ: /proc/PID/stat counts CPU time in these. */
const TICKS_PER_SECOND = 100;

export interface ProcessSample {
  cpuTicks: number;
  atMs: number;
}

/** utime + stime of `pid`; undefined when it is gone. */
export async function sampleCpu(pid: number): Promise<ProcessSample | undefined> {
  const text = await fs.readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
  if (text === undefined) return undefined;
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(f[11]) + Number(f[12]); // fields 14 and 15 of proc(5)
  return Number.isFinite(ticks) ? { cpuTicks: ticks, atMs: performance.now() } : undefined;
}

/** CPU used between two samples, in percent of one CPU (docker stats' convention: 200% is two busy CPUs). */
export function cpuPercent(a: ProcessSample, b: ProcessSample): number {
  const wallS = (b.atMs - a.atMs) / 1000;
  if (wallS <= 0) return 0;
  return Math.round(((b.cpuTicks - a.cpuTicks) / TICKS_PER_SECOND / wallS) * 1000) / 10;
}

/** The process's proportional set size (its share of shared pages), else its RSS; bytes. */
export async function processMemoryBytes(pid: number): Promise<number | undefined> {
  const rollup = await fs.readFile(`/proc/${pid}/smaps_rollup`, 'utf8').catch(() => undefined);
  const pss = rollup ? /^Pss:\s+(\d+) kB/m.exec(rollup)?.[1] : undefined;
  if (pss !== undefined) return Number(pss) * 1024;
  const status = await fs.readFile(`/proc/${pid}/status`, 'utf8').catch(() => undefined);
  const rss = status ? /^VmRSS:\s+(\d+) kB/m.exec(status)?.[1] : undefined;
  return rss === undefined ? undefined : Number(rss) * 1024;
}

/** Bytes a sparse disk image really occupies on the host. */
export async function allocatedBytes(file: string): Promise<number | undefined> {
  const st = await fs.stat(file).catch(() => undefined);
  return st ? st.blocks * 512 : undefined;
}

/** One `docker stats` row, as spec/openapi.json has it. */
export type InstanceStats = ApiSchemas['InstanceStats'];

/** What the guest says of itself (the agent's `stats`), when it can answer. */
export type GuestStats = { memTotalKiB: number; memAvailableKiB: number; processes: number } | undefined;

/**
 * One `docker stats` row: CPU of the VMM process since `previous` (or over a short sample when
 * there is none), the VMM's memory, the disk's allocated bytes, and the guest's own figures.
 * Returns the row and the sample to measure the next call's CPU from.
 */
export async function measure(
  row: InstanceRow,
  vmmPid: number | undefined,
  diskPath: string | undefined,
  guest: GuestStats,
  previous: ProcessSample | undefined,
): Promise<{ stats: InstanceStats; sample: ProcessSample | undefined }> {
  let cpu: number | null = null;
  let sample = previous;
  if (vmmPid !== undefined) {
    let before = previous;
    if (!before) {
      before = await sampleCpu(vmmPid);
      await new Promise((r) => setTimeout(r, 250));
    }
    const now = await sampleCpu(vmmPid);
    if (before && now) {
      cpu = cpuPercent(before, now);
      sample = now;
    }
  }
  const stats: InstanceStats = {
    id: row.id,
    handle: row.handle,
    state: row.state,
    cpuPercent: cpu,
    vmmMemoryBytes: vmmPid !== undefined ? ((await processMemoryBytes(vmmPid)) ?? null) : null,
    memoryLimitBytes: row.memoryMiB * 1024 * 1024,
    guestMemoryUsedBytes: guest ? (guest.memTotalKiB - guest.memAvailableKiB) * 1024 : null,
    guestMemoryTotalBytes: guest ? guest.memTotalKiB * 1024 : null,
    processes: guest ? guest.processes : null,
    diskUsedBytes: diskPath ? ((await allocatedBytes(diskPath)) ?? null) : null,
    ...(isIdlePaused(row) ? { idlePaused: true } : {}),
  };
  return { stats, sample };
}
