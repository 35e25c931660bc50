/**
 * The CLI a Docker user already knows (first part of issue "The CLI a Docker user already
 * knows"): Docker's verbs, `--rm` as a boolean, Docker's exit statuses, quiet pipes, and a
 * `run` killed by SIGTERM or SIGHUP that leaves no instance behind.
 */
import { execFile, spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, qemuProcessesFor, useDaemon } from './fixture.js';

const daemon = useDaemon();
const AEGIS = path.join(ROOT, 'bin/aegis');

describe('docker-style CLI', () => {
  // `aegis run --rm echo hi` used to answer "command not found: hi": --rm took a value.
  it('takes --rm as a boolean: it never eats the next word; =false keeps the instance; other values are refused', async () => {
    const d = daemon();
    const hi = await d.cli(['run', '--rm', '--network', 'none', 'echo', 'hi']);
    expect([hi.stdout, hi.code]).toEqual(['hi\n', 0]);
    const bad = await d.cli(['run', '--rm=garbage', 'echo', 'hi']);
    expect(bad.code).toBe(125);
    expect(bad.stderr).toMatch(/invalid value "garbage" for --rm.*\[INVALID_ARGUMENT\]/);
    const kept = await d.cli(['run', '--rm=false', '--name', 'kept', '--network', 'none', '--', 'echo', 'kept']);
    expect(kept.stdout).toBe('kept\n');
    expect((await d.client.getInstance('kept')).state).toBe('stopped');
  });

  // `aegis run -- nosuchcmd` exited 1, like a workload that exits 1.
  it("exits as docker does: the workload's status, 127 for a command not found, 125 for an Aegis error", async () => {
    const d = daemon();
    expect((await d.cli(['run', '--network', 'none', '--', 'sh', '-c', 'exit 3'])).code).toBe(3);
    expect((await d.cli(['run', '--network', 'none', '--', 'nosuchcmd'])).code).toBe(127);
    expect((await d.cli(['run', '--memory', '1', '--', 'true'])).code).toBe(125);
  });

  it('has ps, rm, stop, start, kill and inspect at the top level; rm goes on past a missing name and exits 1', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'v1', command: ['sleep', '600'], network: 'none' });
    const ps = await d.cli(['ps']);
    expect(ps.stdout).toMatch(/^HANDLE .*\nv1 +[0-9a-f]{12} +running/);
    const id = (await d.client.getInstance('v1')).id;
    expect((await d.cli(['ps', '-q'])).stdout).toBe(`${id.slice(0, 12)}\n`);
    expect(JSON.parse((await d.cli(['inspect', 'v1'])).stdout)).toMatchObject([{ handle: 'v1', state: 'running' }]);
    expect((await d.cli(['kill', 'v1'])).code).toBe(0);
    for (let i = 0; i < 50 && (await d.client.getInstance('v1')).state !== 'stopped'; i++) await new Promise((r) => setTimeout(r, 100));
    expect((await d.client.getInstance('v1')).exitCode).toBe(137);
    expect((await d.cli(['start', 'v1'])).stdout).toBe('v1\n');
    expect((await d.client.getInstance('v1')).state).toBe('running');
    expect((await d.cli(['stop', '-t', '1', 'v1'])).code).toBe(0);
    const rm = await d.cli(['rm', 'nosuch', 'v1']);
    expect(rm.code).toBe(1);
    expect(rm.stderr).toMatch(/no instance "nosuch"/);
    expect(rm.stdout).toBe('v1\n');
    expect((await d.client.listInstances({ all: true })).map((i) => i.handle)).toEqual([]);
  });

  // `aegis logs web | head -1` ended in a Node stack trace (EPIPE).
  it('ends quietly with status 0 when its reader goes away (logs | head -1)', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'many', command: ['sh', '-c', 'seq 1 20000; exec sleep 600'], network: 'none' });
    for (let i = 0; i < 100 && !(await d.cli(['logs', 'many', '--tail', '1'])).stdout.includes('20000'); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const r = await new Promise<{ out: string; err: string; code: number | null }>((resolve) =>
      execFile('bash', ['-c', `set -o pipefail; "${AEGIS}" logs many | head -1`], { env: d.env }, (e, out, err) =>
        resolve({ out, err, code: e ? (typeof e.code === 'number' ? e.code : 1) : 0 }),
      ),
    );
    expect(r.out).toBe('1\n');
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
  });

  // `timeout 4 aegis run --name t -- sleep 40` left `t` running, then stopped, never deleted.
  for (const signal of ['SIGTERM', 'SIGHUP'] as const) {
    it(`a run killed by ${signal} deletes its instance: no instance and no VM left`, async () => {
      const d = daemon();
      const child = spawn(AEGIS, ['run', '--name', 'gone', '--network', 'none', '--', 'sleep', '60'], { env: d.env, stdio: 'ignore' });
      for (let i = 0; i < 300; i++) {
        const list = await d.client.listInstances({ all: true });
        if (list.some((x) => x.handle === 'gone' && x.state === 'running')) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
      child.kill(signal);
      expect(await exited).toBe(signal === 'SIGTERM' ? 143 : 129);
      expect((await d.client.listInstances({ all: true })).map((x) => x.handle)).toEqual([]);
      expect(await qemuProcessesFor(d.home)).toEqual([]);
    });
  }
});
