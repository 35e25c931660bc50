/** What the guest looks like from inside: PID 1's work, as the workload sees it. */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { useDaemon } from './fixture.js';

const daemon = useDaemon();

describe('inside the guest', () => {
  it('has /proc, /sys, /dev, /dev/pts, /tmp and /run mounted and loopback up', async () => {
    const r = await daemon().cli([
      'run',
      '--',
      'sh',
      '-c',
      'for m in /proc /sys /dev /dev/pts /tmp /run; do grep -q " $m " /proc/mounts && echo "$m ok"; done; cat /sys/class/net/lo/flags; grep " / " /proc/mounts | cut -d" " -f3',
    ]);
    expect(r.stdout).toBe('/proc ok\n/sys ok\n/dev ok\n/dev/pts ok\n/tmp ok\n/run ok\n0x9\noverlay\n');
  });

  it('reaps orphaned processes: no zombie is left after a daemonized child exits', async () => {
    const r = await daemon().cli([
      'run',
      '--',
      'sh',
      '-c',
      // The inner shell exits at once, orphaning `sleep`, which PID 1 inherits and must reap.
      'sh -c "sleep 0.3 &"; sleep 2; ps -eo stat=,comm= | grep "^Z" || echo no-zombies',
    ]);
    expect(r.stdout).toBe('no-zombies\n');
  });

  it('names the guest after the instance handle', async () => {
    const r = await daemon().cli(['run', '--name', 'my-box', '--', 'sh', '-c', 'uname -n; hostname']);
    expect(r.stdout).toBe('my-box\nmy-box\n'); // `hostname` is there too (a newcomer's first command)
  });

  it('runs the workload with the environment and working directory it was given', async () => {
    const r = await daemon().cli(['run', '-e', 'GREETING=hi there', '-w', '/tmp', '--', 'sh', '-c', 'echo "$GREETING from $(pwd)"']);
    expect(r.stdout).toBe('hi there from /tmp\n');
  });

  it("hides the agent from the workload: ps shows the workload's own processes, node is not on PATH, awk, which and pager are", async () => {
    const d = daemon();
    // The workload traps SIGTERM: a signal for it must reach it, not the helper standing in for it.
    await d.cli([
      'run',
      '-d',
      '--name',
      'hygiene',
      '--network',
      'none',
      '--',
      'sh',
      '-c',
      'trap "echo got-term; exit 7" TERM; while :; do sleep 0.2; done',
    ]);
    const ps = await d.cli([
      'exec',
      'hygiene',
      '--',
      'sh',
      '-c',
      'ps -e -o pid=,args= | grep -v "ps -e" ; command -v node || echo no-node; which awk; echo x | awk "{print \\"awk-ok\\"}"; which pager; echo pager-ok | pager',
    ]);
    const lines = ps.stdout.trim().split('\n');
    expect(lines.filter((l) => /harness|node /.test(l))).toEqual([]);
    expect(lines[0]).toMatch(/^\s*1 \/aegis\/init$/); // the namespace's init, which reaps its orphans
    expect(lines.some((l) => l.includes('trap "echo got-term; exit 7" TERM'))).toBe(true);
    expect(lines.slice(-5)).toEqual(['no-node', '/usr/bin/awk', 'awk-ok', '/usr/bin/pager', 'pager-ok']);
    // A mount made by the workload is seen by the files API (mounts are shared both ways).
    // (The base rootfs has no mount(8): mount(2) through python's ctypes.)
    const mount = [
      'import ctypes, os',
      'os.makedirs("/mnt/t", exist_ok=True)',
      'libc = ctypes.CDLL(None, use_errno=True)',
      'assert libc.mount(b"none", b"/mnt/t", b"tmpfs", 0, None) == 0, os.strerror(ctypes.get_errno())',
      'open("/mnt/t/f", "w").write("in-tmpfs\\n")',
    ].join('\n');
    expect((await d.cli(['exec', 'hygiene', '--', 'python3', '-c', mount])).code).toBe(0);
    const out = path.join(d.home, 'from-tmpfs');
    expect((await d.cli(['cp', 'hygiene:/mnt/t/f', out])).code).toBe(0);
    expect(readFileSync(out, 'utf8')).toBe('in-tmpfs\n');
    // The agent's own view (aegis top) still sees everything.
    expect((await d.cli(['top', 'hygiene'])).stdout).toContain('harness.mjs');
    expect((await d.cli(['kill', '-s', 'TERM', 'hygiene'])).code).toBe(0);
    expect((await d.cli(['wait', 'hygiene'])).stdout).toBe('7\n');
    expect((await d.cli(['logs', 'hygiene'])).stdout).toBe('got-term\n');
    await d.cli(['rm', 'hygiene']);
  });

  it('reports a workload killed by a signal as 128 + the signal number', async () => {
    const r = await daemon().cli(['run', '--', 'sh', '-c', 'kill -TERM $$']);
    expect(r.code).toBe(143);
  });
});

describe('daemon control from the CLI', () => {
  it('aegis status and aegis doctor say which backend and acceleration are in use', async () => {
    const d = daemon();
    const status = await d.cli(['status']);
    expect(status.code).toBe(0);
    expect(status.stdout).toMatch(/backend:\s+qemu \(.*(KVM|TCG)/);
    // Whatever this host's /dev/kvm is, both say the same thing about it, in one line.
    const { backend } = await d.client.status();
    expect(backend.accelerationReason).toMatch(/KVM|TCG/);
    expect(status.stdout).toContain(`accel:     ${backend.accelerationReason}\n`);
    const doctor = await d.cli(['doctor']);
    expect(doctor.stdout).toMatch(/ok\s+backend qemu/);
    expect(doctor.stdout).toMatch(/acceleration\s+(KVM|TCG|\/dev\/kvm present but it cannot run the guest: .+; using TCG)/);
    if (!/being tested/.test(backend.accelerationReason)) expect(doctor.stdout).toContain(backend.accelerationReason);
    expect(doctor.stdout).toMatch(/ok\s+aegisd\s+running/);
    expect(doctor.code).toBe(0);
    // One line per check, each marked ok, warn or missing; the same as JSON.
    const lines = doctor.stdout.trimEnd().split('\n');
    for (const line of lines) expect(line).toMatch(/^(ok|warn|missing) +\S/);
    const json = await d.cli(['doctor', '--json']);
    const checks = JSON.parse(json.stdout) as { name: string; status: string; detail: string }[];
    expect(checks.map((c) => c.name)).toEqual(lines.map((l) => l.slice(8, 28).trim()));
    expect(checks.find((c) => c.name === 'backend qemu')?.status).toBe('ok');
    expect(checks.find((c) => c.name === 'acceleration')?.status).toBe(backend.acceleration === 'kvm' ? 'ok' : 'warn');
  });

  it('aegis down stops the daemon and aegis up starts it again, finding its instances', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'keep', command: ['sleep', '600'] });
    const down = await d.cli(['down']);
    expect(down.stdout).toMatch(/^aegisd stopped/);
    expect((await d.cli(['status'])).code).toBe(1);
    const up = await d.cli(['up']);
    expect(up.stdout).toMatch(/^aegisd started/);
    expect((await d.cli(['up'])).stdout).toMatch(/already running/);
    expect((await d.cli(['exec', 'keep', '--', 'echo', 'ok'])).stdout).toBe('ok\n');
    // Hand the daemon back to the fixture, which owns the process it started.
    await d.cli(['down']);
    await d.start();
  });
});
