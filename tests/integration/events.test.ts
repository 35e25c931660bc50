/**
 * `aegis events` on real VMs: a scripted scenario's every lifecycle change arrives once, in
 * order, with its fields, to a live subscriber (the SDK's `events()`), and the same history is
 * read back with `--since` after aegisd was SIGKILLed and started again.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { events, type SandboxEvent } from '@aegis/sdk';
import { useDaemon } from './fixture.js';
import { getOnSocket, parseMetrics, valueOf, type Family } from '../support/prometheus.js';

const daemon = useDaemon();

/** The parts of an event a scenario can predict (not ids, times or sequence numbers). */
function shape(e: SandboxEvent): string {
  const parts = [e.type, e.handle ?? '-'];
  if (e.state) parts.push(e.state);
  if (e.exitCode !== undefined) parts.push(`exit=${e.exitCode}`);
  if (e.forks) parts.push(`forks=${e.forks.join(',')}`);
  if (e.labels) parts.push(`labels=${JSON.stringify(e.labels)}`);
  return parts.join(' ');
}

describe('aegis events and /metrics', () => {
  it('every lifecycle change of a scenario once, in order, with its fields; the same history after an aegisd SIGKILL (--since)', async () => {
    const d = daemon();
    const t0 = Date.now();
    const seen: SandboxEvent[] = [];
    const stop = new AbortController();
    const following = (async () => {
      for await (const ev of events({ socketPath: path.join(d.home, 'aegisd.sock'), signal: stop.signal })) seen.push(ev);
    })();
    // The subscription is live once the daemon has it; an event published before would be missed.
    await new Promise((r) => setTimeout(r, 500));

    // A throwaway run with a label, exiting 3.
    const run = await d.cli(['run', '--rm', '--name', 'ev-run', '--label', 'team=a', '--', 'sh', '-c', 'exit 3']);
    expect(run.code).toBe(3);
    // A kept instance through pause, hibernation, a snapshot and a fork, then removed.
    expect((await d.cli(['instance', 'start', '--name', 'ev-a', '--', 'sleep', '600'])).code).toBe(0);
    for (const args of [
      ['pause', 'ev-a'],
      ['unpause', 'ev-a'],
      ['hibernate', 'ev-a'],
      ['exec', 'ev-a', '--', 'true'],
      ['snapshot', 'create', 'ev-a', '--name', 'ev-snap'],
      ['fork', 'ev-a', '--name', 'ev-b'],
      ['rm', '-f', 'ev-a', 'ev-b'],
      ['snapshot', 'rm', 'ev-snap'],
    ]) {
      const r = await d.cli(args);
      expect(r.stderr, args.join(' ')).toBe('');
      expect(r.code, args.join(' ')).toBe(0);
    }
    // A deadline, and a refused destination (the metadata address) on the default network.
    expect((await d.cli(['instance', 'start', '--name', 'ev-c', '--timeout', '12s', '--', 'sleep', '600'])).code).toBe(0);
    const probe = await d.cli([
      'exec',
      'ev-c',
      '--',
      'python3',
      '-c',
      "import urllib.request; urllib.request.urlopen('http://169.254.169.254/', timeout=5)",
    ]);
    expect(probe.code).not.toBe(0);
    expect(probe.stderr).toMatch(/Connection reset by peer/);
    await expect.poll(async () => (await d.client.getInstance('ev-c')).state, { timeout: 30_000 }).toBe('stopped');
    await d.client.deleteInstance('ev-c');

    const expected = [
      'create ev-run starting labels={"team":"a"}',
      'start ev-run running labels={"team":"a"}',
      'exit ev-run running exit=3 labels={"team":"a"}',
      'stop ev-run stopped exit=3 labels={"team":"a"}',
      'delete ev-run labels={"team":"a"}',
      'create ev-a starting',
      'start ev-a running',
      'pause ev-a paused',
      'resume ev-a running',
      'hibernate ev-a hibernated',
      'restore ev-a running',
      'snapshot ev-a running',
      'create ev-b starting',
      'start ev-b running',
      'fork ev-a forks=ev-b',
      'stop ev-a stopped exit=143',
      'delete ev-a',
      'stop ev-b stopped exit=143',
      'delete ev-b',
      'create ev-c starting',
      'start ev-c running',
      'egress-denied ev-c',
      'deadline ev-c running',
      'stop ev-c stopped exit=143',
      'delete ev-c',
    ];
    for (let waited = 0; seen.length < expected.length && waited < 10_000; waited += 100) await new Promise((r) => setTimeout(r, 100));
    await new Promise((r) => setTimeout(r, 500));
    expect(seen.map(shape)).toEqual(expected);
    // Numbered in order, with their fields.
    expect(seen.map((e) => e.seq)).toEqual(seen.map((_, i) => (seen[0]?.seq ?? 0) + i));
    expect(seen.every((e) => e.timeMs >= t0 && e.timeMs <= Date.now() && /^[0-9a-f]{16}$/.test(e.instanceId ?? ''))).toBe(true);
    const denied = seen.find((e) => e.type === 'egress-denied');
    expect(denied?.destination).toBe('169.254.169.254:80');
    expect(denied?.reason).toMatch(/link-local|refused|metadata/);
    expect(seen.find((e) => e.type === 'deadline')?.reason).toMatch(/deadline reached/);
    expect(seen.find((e) => e.type === 'snapshot')?.snapshot).toBe('ev-snap');
    stop.abort();
    await following;

    // The history survives aegisd's SIGKILL: --since reads the same events, in the same order.
    await d.kill();
    await d.start();
    const since = await d.cli(['events', '--since', `${Math.floor(t0 / 1000)}`, '--until', '0s', '--json']);
    expect(since.code).toBe(0);
    const stored = since.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as SandboxEvent);
    expect(stored).toEqual(seen);
    // Filters: by type, by instance, by label; the human form names each.
    const forks = await d.cli([
      'events',
      '--since',
      '1h',
      '--until',
      '0s',
      '--filter',
      'event=fork',
      '--format',
      '{{.handle}} {{join .forks " "}}',
    ]);
    expect(forks.stdout).toBe('ev-a ev-b\n');
    const labelled = await d.cli(['events', '--since', '1h', '--until', '0s', '--filter', 'label=team=a']);
    expect(
      labelled.stdout
        .trim()
        .split('\n')
        .map((l) => l.split(' ').slice(1, 4).join(' ')),
    ).toEqual([
      'instance create ev-run',
      'instance start ev-run',
      'instance exit ev-run',
      'instance stop ev-run',
      'instance delete ev-run',
    ]);
    const one = await d.cli(['events', '--since', '1h', '--until', '0s', '--filter', 'instance=ev-b', '--filter', 'event=stop']);
    expect(one.stdout).toMatch(/^\S+ instance stop ev-b \(id=[0-9a-f]{16}, state=stopped, exitCode=143, reason="stopped by request"\)\n$/);
    const bad = await d.cli(['events', '--filter', 'event=exploded', '--until', '0s']);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/unknown event type "exploded".*\[INVALID_ARGUMENT\]/);
  });
  it('/metrics in Prometheus text: per-instance state, VMM CPU and memory, guest memory, disk, execs, egress and start latency move as instances run; a scrape never wakes one', async () => {
    const d = daemon();
    const sock = path.join(d.home, 'aegisd.sock');
    const scrape = async (): Promise<Map<string, Family>> => {
      const r = await getOnSocket(sock, '/metrics');
      expect(r.status).toBe(200);
      expect(r.type).toMatch(/^text\/plain; version=0\.0\.4/);
      return parseMetrics(r.body);
    };
    const before = await scrape();
    const execsBefore = valueOf(before, 'aegis_execs_total', { result: 'exited' }) ?? 0;
    expect(valueOf(before, 'aegisd_event_loop_delay_p99_seconds')).toBeGreaterThanOrEqual(0);
    const inst = await d.client.createInstance({ handle: 'm1', command: ['sleep', '600'], memoryMiB: 256 });
    for (let i = 0; i < 3; i++) expect((await d.cli(['exec', 'm1', '--', 'true'])).code).toBe(0);
    await d.cli(['exec', 'm1', '--', 'python3', '-c', "import urllib.request; urllib.request.urlopen('http://10.99.0.5/', timeout=5)"]);
    const l = { instance: inst.id, handle: 'm1' };
    const a = await scrape();
    expect(valueOf(a, 'aegis_instances', { state: 'running' })).toBe(1);
    expect(valueOf(a, 'aegis_instance_state', { ...l, state: 'running' })).toBe(1);
    expect(valueOf(a, 'aegis_execs_total', { result: 'exited' })).toBe(execsBefore + 4);
    expect(valueOf(a, 'aegis_exec_seconds')).toBe(execsBefore + 4);
    expect(a.get('aegis_exec_seconds')?.type).toBe('HISTOGRAM');
    expect(valueOf(a, 'aegis_instance_start_seconds')).toBeGreaterThanOrEqual(1);
    expect(
      a
        .get('aegis_instance_starts_total')
        ?.metrics.some((s) => Number(s.value) >= 1 && /^(cold|template|pool)$/.test(s.labels?.['kind'] ?? '')),
    ).toBe(true);
    const cpu1 = valueOf(a, 'aegis_instance_cpu_seconds_total', l) ?? 0;
    expect(cpu1).toBeGreaterThan(0);
    expect(valueOf(a, 'aegis_instance_memory_bytes', { ...l, kind: 'host_pss' })).toBeGreaterThan(16 << 20);
    const guestTotal = valueOf(a, 'aegis_instance_memory_bytes', { ...l, kind: 'guest_total' }) ?? 0;
    expect(guestTotal).toBeGreaterThan(150 << 20);
    expect(guestTotal).toBeLessThanOrEqual(256 << 20);
    expect(valueOf(a, 'aegis_instance_disk_allocated_bytes', l)).toBeGreaterThan(0);
    expect(valueOf(a, 'aegis_instance_egress_decisions_total', { ...l, decision: 'denied' })).toBeGreaterThanOrEqual(1);
    // CPU moves with work; a hibernated instance has no VMM to read, and a scrape leaves it asleep.
    expect((await d.cli(['exec', 'm1', '--', 'sh', '-c', 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done'])).code).toBe(0);
    const b = await scrape();
    expect(valueOf(b, 'aegis_instance_cpu_seconds_total', l)).toBeGreaterThan(cpu1);
    await d.client.hibernateInstance('m1');
    const c = await scrape();
    expect(valueOf(c, 'aegis_instance_state', { ...l, state: 'hibernated' })).toBe(1);
    expect(valueOf(c, 'aegis_instance_memory_bytes', { ...l, kind: 'host_pss' })).toBeUndefined();
    expect((await d.client.getInstance('m1')).state).toBe('hibernated');
    await d.client.resumeInstance('m1');
    const w = await scrape();
    expect(valueOf(w, 'aegis_instance_wakes_total', { from: 'hibernation' })).toBe(1);
    expect(valueOf(w, 'aegis_instance_wake_seconds')).toBeGreaterThanOrEqual(1);
    await d.client.deleteInstance('m1', { force: true });
    const gone = await scrape();
    expect(valueOf(gone, 'aegis_instance_state', l)).toBeUndefined();
  });
});
