/**
 * The detached-process supervisor against real processes (sleep, sh, node): what every backend
 * relies on to start, find again, watch and end its VMM.
 */
import { mkdtempSync, readFileSync, rmSync, existsSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { DetachedProcess, findStrays, procStat } from './process.js';

let dir: string;
const started: number[] = [];

beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-proc-'));
});
afterEach(() => {
  for (const pid of started.splice(0)) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
  rmSync(dir, { recursive: true, force: true });
});

async function spawn(binary: string, args: string[]): Promise<DetachedProcess> {
  const p = await DetachedProcess.spawn(binary, args, { logFile: path.join(dir, 'log') });
  started.push(p.pid);
  return p;
}

async function until(cond: () => boolean | Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe('DetachedProcess.spawn', () => {
  it('starts the process in a session of its own, output appended to the log, and reports its exit status', async () => {
    const p = await spawn('sh', ['-c', 'echo hello; exit 3']);
    expect(await p.exited).toEqual({ code: 3, signal: null, statusKnown: true });
    expect(readFileSync(path.join(dir, 'log'), 'utf8')).toBe('hello\n');
  });

  it('puts it in its own session (it outlives a daemon that exits)', async () => {
    const p = await spawn('sleep', ['30']);
    const stat = readFileSync(`/proc/${p.pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // Field 6 (session id) is fields[3]: a session leader's is its own pid.
    expect(Number(fields[3])).toBe(p.pid);
    expect(p.identity()).toEqual({ pid: p.pid, startTicks: (await procStat(p.pid))?.startTicks });
    await p.stop({ timeoutMs: 1000 });
  });

  it('fails with UNAVAILABLE when the binary does not exist', async () => {
    await expect(spawn('/nonexistent/vmm', [])).rejects.toMatchObject({ code: 'UNAVAILABLE' });
  });

  it('reports a process killed by a signal', async () => {
    const p = await spawn('sleep', ['30']);
    p.kill('SIGKILL');
    expect(await p.exited).toEqual({ code: null, signal: 'SIGKILL', statusKnown: true });
  });
});

describe('DetachedProcess.stop', () => {
  it('asks with SIGTERM and returns once the process has gone', async () => {
    const p = await spawn('sleep', ['30']);
    await p.stop({ timeoutMs: 5000 });
    expect(await p.exited).toMatchObject({ signal: 'SIGTERM' });
  });

  it('kills a process that ignores SIGTERM once timeoutMs has passed', async () => {
    const p = await spawn('sh', ['-c', 'trap "" TERM; while :; do sleep 0.05; done']);
    await new Promise((r) => setTimeout(r, 100)); // the trap is set
    const t0 = Date.now();
    await p.stop({ timeoutMs: 300 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(250);
    expect(await p.exited).toMatchObject({ signal: 'SIGKILL' });
  });

  it('kills at once when the stop is aborted', async () => {
    const p = await spawn('sh', ['-c', 'trap "" TERM; while :; do sleep 0.05; done']);
    const ac = new AbortController();
    setTimeout(() => ac.abort(), 50);
    const t0 = Date.now();
    await p.stop({ timeoutMs: 30_000, signal: ac.signal });
    expect(Date.now() - t0).toBeLessThan(5000);
  });

  it('uses the given graceful request instead of SIGTERM, and does not wait on it', async () => {
    const p = await spawn('sleep', ['30']);
    let asked = false;
    await p.stop({ timeoutMs: 200, ask: () => ((asked = true), new Promise(() => undefined)) });
    expect(asked).toBe(true);
    expect(await p.exited).toMatchObject({ signal: 'SIGKILL' });
  });

  it('after release: `exited` never resolves, and stop still ends the process and returns', async () => {
    const p = await spawn('sleep', ['30']);
    p.release();
    let resolved = false;
    void p.exited.then(() => (resolved = true));
    await p.stop({ timeoutMs: 1000 });
    expect(alive(p.pid)).toBe(false);
    await new Promise((r) => setTimeout(r, 50));
    expect(resolved).toBe(false);
  });
});

describe('DetachedProcess.adopt', () => {
  it('finds a running process from its identity and notices its end by polling (status unknown)', async () => {
    const p = await spawn('sleep', ['30']);
    p.release();
    const again = await DetachedProcess.adopt(p.identity());
    expect(again?.pid).toBe(p.pid);
    expect(again?.isChild).toBe(false);
    process.kill(p.pid, 'SIGKILL');
    const exit = await Promise.race([again?.exited, new Promise((r) => setTimeout(() => r('not noticed'), 2000))]);
    expect(exit).toEqual({ code: null, signal: null, statusKnown: false });
  });

  it('refuses a pid whose start time differs (the pid was reused by another process)', async () => {
    const p = await spawn('sleep', ['30']);
    expect(await DetachedProcess.adopt({ pid: p.pid, startTicks: (p.startTicks ?? 0) + 1 })).toBeUndefined();
    await p.stop({ timeoutMs: 0 });
  });

  it("refuses a process whose command line the backend's check rejects, and a pid that is gone", async () => {
    const p = await spawn('sleep', ['30']);
    expect(await DetachedProcess.adopt(p.identity(), (argv) => argv.includes('31'))).toBeUndefined();
    expect(await DetachedProcess.adopt(p.identity(), (argv) => argv.includes('30'))).toBeDefined();
    await p.stop({ timeoutMs: 0 });
    expect(await DetachedProcess.adopt(p.identity())).toBeUndefined();
  });

  it('counts a zombie as gone: a process whose parent never reaps it does not hold `exited` or `stop`', async () => {
    // The sh becomes `sleep 30`, which never waits for the `sleep 0.3` it inherited: a zombie.
    const pidFile = path.join(dir, 'child.pid');
    await spawn('sh', ['-c', `sleep 0.3 & echo $! > ${pidFile}; exec sleep 30`]);
    await until(() => existsSync(pidFile) && readFileSync(pidFile, 'utf8').trim() !== '');
    const zombiePid = Number(readFileSync(pidFile, 'utf8'));
    const child = await DetachedProcess.adopt({ pid: zombiePid });
    expect(child).toBeDefined();
    const exit = await Promise.race([child?.exited, new Promise((r) => setTimeout(() => r('not noticed'), 3000))]);
    expect(exit).toMatchObject({ statusKnown: false });
    expect(alive(zombiePid)).toBe(true); // still in the process table, as a zombie
    expect((await procStat(zombiePid))?.state).toBe('Z');
    const t0 = Date.now();
    await child?.stop({ timeoutMs: 5000 });
    expect(Date.now() - t0).toBeLessThan(2500); // a second's grace for a parent to reap it
    expect(await DetachedProcess.adopt({ pid: zombiePid })).toBeUndefined();
  });
});

describe('findStrays', () => {
  const script = 'setTimeout(() => {}, 30_000)';
  const classify = (argv: string[]): { what: string; helper: boolean } | undefined =>
    argv.includes('--vmm') ? { what: 'vmm', helper: false } : argv.includes('--helper') ? { what: 'helper', helper: true } : undefined;

  it('lists the processes under a directory that no kept VM owns; a kept VM keeps its helpers', async () => {
    const a = await spawn(process.execPath, ['-e', script, '--', '--vmm', path.join(dir, 'a', 'vm', 'disk')]);
    const aHelper = await spawn(process.execPath, ['-e', script, '--', '--helper', path.join(dir, 'a', 'vm', 'net.sock')]);
    const b = await spawn(process.execPath, ['-e', script, '--', '--vmm', path.join(dir, 'b', 'vm', 'disk')]);
    const bHelper = await spawn(process.execPath, ['-e', script, '--', '--helper', path.join(dir, 'b', 'vm', 'net.sock')]);
    const unrelated = await spawn(process.execPath, ['-e', script, '--', path.join(dir, 'c', 'file')]);
    await until(async () => (await findStrays(dir, [], classify)).length === 4);

    const strays = await findStrays(dir, [{ identity: a.identity(), stateDir: path.join(dir, 'a', 'vm') }], classify);
    expect(strays.map((s) => [s.pid, s.owner, s.what]).sort()).toEqual(
      [
        [b.pid, 'b', 'vmm'],
        [bHelper.pid, 'b', 'helper'],
      ].sort(),
    );
    for (const s of strays) expect(s.end()).toBe(true);
    await b.exited;
    await bHelper.exited;
    expect(alive(a.pid) && alive(aHelper.pid) && alive(unrelated.pid)).toBe(true);
  });

  it('does not keep a VMM whose pid matches a record but whose start time does not', async () => {
    const a = await spawn(process.execPath, ['-e', script, '--', '--vmm', path.join(dir, 'a', 'vm', 'disk')]);
    await until(async () => (await findStrays(dir, [], classify)).length === 1);
    const stale = { identity: { pid: a.pid, startTicks: (a.startTicks ?? 0) - 1 }, stateDir: path.join(dir, 'a', 'vm') };
    expect((await findStrays(dir, [stale], classify)).map((s) => s.pid)).toEqual([a.pid]);
  });
});
