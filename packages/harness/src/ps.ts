/**
 * The guest's processes for `aegis top`, read from /proc (an image need not have `ps`).
 * The harness and aegis-init are listed too: they are what the guest runs.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import { MAX_PS_COMMAND, MAX_PS_PROCESSES, type ProcessInfo, type PsResult, type StatsResult } from '@aegis/protocol';

/** USER_HZ, the unit of /proc/PID/stat's times: 100 on every Linux ABI we boot. */
const TICKS_PER_SECOND = 100;
const PAGE_KIB = 4;

/** Parses /proc/PID/stat: the command name sits in parentheses and may hold spaces and ')'. */
export function parseStat(
  text: string,
): { ppid: number; state: string; cpuTicks: number; startTicks: number; rssPages: number } | undefined {
  const close = text.lastIndexOf(')');
  if (close < 0) return undefined;
  // Fields after the name, numbered as in proc(5) from 3 (state).
  const f = text.slice(close + 2).split(' ');
  const n = (i: number): number => Number(f[i - 3]);
  const state = f[0] ?? '?';
  const out = { ppid: n(4), state, cpuTicks: n(14) + n(15), startTicks: n(22), rssPages: n(24) };
  return Object.values(out).every((v) => typeof v === 'string' || Number.isFinite(v)) ? out : undefined;
}

async function one(pid: number): Promise<ProcessInfo | undefined> {
  const dir = `/proc/${pid}`;
  const [statText, cmdline, st] = await Promise.all([
    readFile(`${dir}/stat`, 'utf8').catch(() => undefined),
    readFile(`${dir}/cmdline`).catch(() => undefined),
    stat(dir).catch(() => undefined),
  ]);
  const s = statText === undefined ? undefined : parseStat(statText);
  if (!s || !st || !/^[A-Za-z]$/.test(s.state)) return undefined; // it exited meanwhile
  let command = cmdline ? cmdline.toString('utf8').replace(/\0+$/, '').replaceAll('\0', ' ') : '';
  // Kernel threads have no command line: ps shows their name in brackets.
  if (!command && statText) command = `[${statText.slice(statText.indexOf('(') + 1, statText.lastIndexOf(')'))}]`;
  return {
    pid,
    ppid: s.ppid,
    uid: st.uid,
    state: s.state,
    rssKiB: s.rssPages * PAGE_KIB,
    cpuMs: Math.round((s.cpuTicks * 1000) / TICKS_PER_SECOND),
    startedAfterBootMs: Math.round((s.startTicks * 1000) / TICKS_PER_SECOND),
    command: command.slice(0, MAX_PS_COMMAND),
  };
}

/** User-space processes only (kernel threads are children of kthreadd, pid 2), by pid. */
export async function listProcesses(): Promise<PsResult> {
  const pids = (await readdir('/proc'))
    .filter((d) => /^\d+$/.test(d))
    .map(Number)
    .sort((a, b) => a - b);
  const all = (await Promise.all(pids.map(one))).filter((p): p is ProcessInfo => p !== undefined && p.pid !== 2 && p.ppid !== 2);
  return all.length > MAX_PS_PROCESSES ? { processes: all.slice(0, MAX_PS_PROCESSES), truncated: true } : { processes: all };
}

/** Memory and process count for `aegis stats`. */
export async function guestStats(): Promise<StatsResult> {
  const info = await readFile('/proc/meminfo', 'utf8');
  const kib = (key: string): number => Number(new RegExp(`^${key}:\\s+(\\d+) kB`, 'm').exec(info)?.[1] ?? 0);
  const total = kib('MemTotal');
  const processes = (await readdir('/proc')).filter((d) => /^\d+$/.test(d)).length;
  return { memTotalKiB: total, memAvailableKiB: Math.min(total, kib('MemAvailable')), processes };
}
