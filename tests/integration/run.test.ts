/** aegis run and instance options: --rm, a second Ctrl-C, VM size, bad flag values, out of memory. */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, qemuProcessesFor, untilNothingLeft, useDaemon } from './fixture.js';

const daemon = useDaemon();

describe('aegis run options', () => {
  it('--rm=false keeps the stopped instance with its exit code and logs', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--rm=false', '--name', 'kept', '--', 'sh', '-c', 'echo kept; exit 4']);
    expect(r.stdout).toBe('kept\n');
    expect(r.code).toBe(4);
    const info = await d.client.getInstance('kept');
    expect(info).toMatchObject({ state: 'stopped', exitCode: 4 });
    expect((await d.cli(['logs', 'kept'])).stdout).toBe('kept\n');
    expect(await qemuProcessesFor(d.home)).toEqual([]);
  });

  it('a second Ctrl-C stops a workload that ignores SIGINT, and nothing is left', async () => {
    const d = daemon();
    const child = spawn(path.join(ROOT, 'bin/aegis'), ['run', '--', 'sh', '-c', 'trap "" INT; echo ready; while :; do sleep 0.1; done'], {
      env: d.env,
    });
    let out = '';
    child.stdout.on('data', (c: Buffer) => {
      out += c.toString();
      if (out === 'ready\n') {
        child.kill('SIGINT');
        setTimeout(() => child.kill('SIGINT'), 1000);
      }
    });
    const code = await new Promise((r) => child.on('close', r));
    expect(code).toBe(130);
    // A throwaway run returns once the workload's status is known; the VM and the instance go
    // behind it (the contract since the warm-pool work, as in core and interactive).
    await untilNothingLeft(d);
  });

  it('--memory and --cpus size the VM', async () => {
    const r = await daemon().cli(['run', '--memory', '256', '--cpus', '2', '--', 'sh', '-c', 'nproc; grep MemTotal /proc/meminfo']);
    const [cpus, mem] = r.stdout.trim().split('\n');
    expect(cpus).toBe('2');
    const kib = Number(/(\d+) kB/.exec(mem ?? '')?.[1]);
    expect(kib).toBeGreaterThan(200 * 1024);
    expect(kib).toBeLessThanOrEqual(256 * 1024);
  });

  it('bad flag values are INVALID_ARGUMENT before any VM boots', async () => {
    const d = daemon();
    for (const args of [
      ['--memory', '64'],
      ['--memory', '70000'],
      ['--cpus', '0'],
      ['--cpus', '65'],
      ['--name', 'bad name!'],
      ['-w', 'relative/dir'],
    ]) {
      const r = await d.cli(['run', ...args, '--', 'true']);
      expect(r.code, args.join(' ')).toBe(125); // docker run's status for an error of its own
      // One line naming the flag the user typed, whether the CLI or the daemon refused it.
      const flag = args[0] === '-w' ? '--workdir' : args[0];
      expect(r.stderr, args.join(' ')).toMatch(new RegExp(`^aegis: [^\n]*${flag}[^\n]* \\[INVALID_ARGUMENT\\]\n$`));
    }
    const notSize = await d.cli(['run', '--memory', 'lots', '--', 'true']);
    expect(notSize.code).toBe(125);
    expect(notSize.stderr).toMatch(/--memory.*"lots" is not a size/);
    expect(await qemuProcessesFor(d.home)).toEqual([]);
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });

  it('a workload the guest kernel kills for memory ends the instance with status 137', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--rm=false', '--name', 'hog', '--memory', '192', '--', 'sh', '-c', 'tail /dev/zero']);
    expect(r.code).toBe(137);
    expect(await d.client.getInstance('hog')).toMatchObject({ state: 'stopped', exitCode: 137 });
  });
});
