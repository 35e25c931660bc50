/** Logs: kept on the host, followed live, filtered, and surviving the daemon. */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, useDaemon } from './fixture.js';

const daemon = useDaemon();

describe('aegis logs', () => {
  it('--follow streams live output and ends when the instance stops', async () => {
    const d = daemon();
    await d.client.createInstance({
      handle: 'f',
      command: ['sh', '-c', 'for i in 1 2 3; do echo tick $i; sleep 0.5; done; echo done >&2'],
    });
    const follower = spawn(path.join(ROOT, 'bin/aegis'), ['logs', '--follow', 'f'], { env: d.env });
    let out = '';
    let err = '';
    follower.stdout.on('data', (c: Buffer) => (out += c.toString()));
    follower.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const code = await new Promise((r) => follower.on('close', r));
    expect(code).toBe(0);
    expect(out).toBe('tick 1\ntick 2\ntick 3\n');
    expect(err).toBe('done\n');
    expect((await d.client.getInstance('f')).state).toBe('stopped');
  });

  it('--tail, --timestamps, --since and --execs', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'l', command: ['sh', '-c', 'echo one; echo two; echo three; exec sleep 600'] });
    for (let i = 0; i < 50 && !(await d.cli(['logs', 'l'])).stdout.includes('three'); i++) await new Promise((r) => setTimeout(r, 100));
    const exec = await d.cli(['exec', 'l', '--', 'echo', 'from exec']);
    expect(exec.stdout).toBe('from exec\n');

    expect((await d.cli(['logs', 'l'])).stdout).toBe('one\ntwo\nthree\n');
    const tail = (await d.cli(['logs', '--tail', '1', 'l'])).stdout;
    expect(tail.endsWith('three\n')).toBe(true);
    expect(tail).not.toContain('one');
    const stamped = (await d.cli(['logs', '--timestamps', 'l'])).stdout.trim().split('\n');
    expect(stamped).toHaveLength(3);
    for (const line of stamped) expect(line).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (one|two|three)$/);
    expect((await d.cli(['logs', '--since', '1h', 'l'])).stdout).toBe('one\ntwo\nthree\n');
    expect((await d.cli(['logs', '--since', new Date(Date.now() + 60_000).toISOString(), 'l'])).stdout).toBe('');
    expect((await d.cli(['logs', '--execs', 'l'])).stdout).toMatch(/^one\ntwo\nthree\n\[exec [0-9a-f]+\] from exec\n$/);
    const bad = await d.cli(['logs', '--since', 'yesterday-ish', 'l']);
    expect(bad.code).not.toBe(0);
  });

  it('outlive an aegisd restart and a stopped instance, and go with the instance', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'keep', command: ['sh', '-c', 'echo before; exec sleep 600'] });
    for (let i = 0; i < 50 && (await d.cli(['logs', 'keep'])).stdout === ''; i++) await new Promise((r) => setTimeout(r, 100));
    await d.kill();
    await d.start();
    expect((await d.cli(['logs', 'keep'])).stdout).toBe('before\n');
    await d.client.stopInstance('keep');
    expect((await d.cli(['logs', 'keep'])).stdout).toBe('before\n');
    await d.client.deleteInstance('keep');
    expect((await d.cli(['logs', 'keep'])).stderr).toMatch(/\[NOT_FOUND\]/);
    expect(d.instanceDirs()).toEqual([]);
  });
});
