import { describe, expect, it } from 'vitest';
import { listProcesses, parseStat } from './ps.js';

describe('ps', () => {
  it('parses a stat line whose command name holds spaces and parentheses', () => {
    const line = '42 (a) b (c)) S 7 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1234 1000000 300 18446744073709551615';
    expect(parseStat(line)).toEqual({ ppid: 7, state: 'S', cpuTicks: 300, startTicks: 1234, rssPages: 300 });
  });

  it('rejects a line that is not a stat line', () => {
    expect(parseStat('garbage')).toBeUndefined();
    expect(parseStat('1 (x) S')).toBeUndefined();
  });

  it("lists this host's own process with its command line", async () => {
    const { processes } = await listProcesses();
    const me = processes.find((p) => p.pid === process.pid);
    expect(me).toMatchObject({ ppid: process.ppid, uid: process.getuid?.() });
    expect(me?.command).toContain('node');
    expect(processes.some((p) => p.ppid === 2)).toBe(false);
  });
});
