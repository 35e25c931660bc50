/**
 * `GET /metrics` (Prometheus text format, prom-client): per instance its state, the host's
 * cost of it (VMM CPU seconds and memory from /proc, disk bytes allocated), what its guest
 * says it uses (only while it runs: a scrape never wakes a paused or hibernated one), execs
 * and egress; for the daemon its event-loop delay, pool fill, and boot, restore and exec
 * latency histograms. Per-instance figures are read at scrape time; histograms are observed
 * where the things happen (instance.ts). One registry per daemon.
 */
import client from 'prom-client';
import type { LoopDelayMonitor } from './lag.js';
import type { InstanceRow } from './registry/db.js';

/** What a scrape reads of one instance (instance.ts gives it). */
export interface InstanceFigures {
  cpuSeconds?: number | undefined;
  hostMemoryBytes?: number | undefined;
  diskAllocatedBytes?: number | undefined;
  guestMemoryUsedBytes?: number | undefined;
  guestMemoryTotalBytes?: number | undefined;
  egressBytesOut: number;
  egressBytesIn: number;
  egressAllowed: number;
  egressDenied: number;
}

/** Where the per-instance figures come from at scrape time. */
export interface MetricsSource {
  rows(): InstanceRow[];
  figures(id: string): Promise<InstanceFigures | undefined>;
  pool(): { ready: number; target: number } | undefined;
  loopDelay: LoopDelayMonitor;
}

const STATES = ['starting', 'running', 'paused', 'stopping', 'stopped', 'failed', 'hibernated'] as const;
/** Seconds: from a pooled VM (~0.1) to a cold boot under TCG (~10). */
const BOOT_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32];
const EXEC_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60];

export class DaemonMetrics {
  readonly registry = new client.Registry();
  private source: MetricsSource | undefined;
  private readonly bootSeconds: client.Histogram;
  private readonly boots: client.Counter<'kind'>;
  private readonly wakeSeconds: client.Histogram;
  private readonly wakes: client.Counter<'from'>;
  private readonly execSeconds: client.Histogram;
  private readonly execs: client.Counter<'result'>;

  constructor() {
    const r = this.registry;
    client.collectDefaultMetrics({ register: r, prefix: 'aegisd_' });
    // Histograms without labels, counters by kind beside them: one latency distribution each,
    // and what it is made of.
    this.bootSeconds = new client.Histogram({
      name: 'aegis_instance_start_seconds',
      help: 'Time from a start to the workload running (aegis_instance_starts_total says how the VMs came up)',
      buckets: BOOT_BUCKETS,
      registers: [r],
    });
    this.boots = new client.Counter({
      name: 'aegis_instance_starts_total',
      help: 'Starts by how the VM came up: cold, template, pool, snapshot',
      labelNames: ['kind'],
      registers: [r],
    });
    this.wakeSeconds = new client.Histogram({
      name: 'aegis_instance_wake_seconds',
      help: 'Time to wake an instance, from an idle pause or from hibernation',
      buckets: BOOT_BUCKETS,
      registers: [r],
    });
    this.wakes = new client.Counter({
      name: 'aegis_instance_wakes_total',
      help: 'Wakes by what the instance was in: idle-pause, hibernation',
      labelNames: ['from'],
      registers: [r],
    });
    this.execSeconds = new client.Histogram({
      name: 'aegis_exec_seconds',
      help: 'Time from an exec request to its exit',
      buckets: EXEC_BUCKETS,
      registers: [r],
    });
    this.execs = new client.Counter({
      name: 'aegis_execs_total',
      help: 'Execs by result: exited (with any status), error (failed to run or cut off)',
      labelNames: ['result'],
      registers: [r],
    });
    // prom-client calls `collect` with the metric as `this`: the source is reached through a closure.
    const source = (): MetricsSource | undefined => this.source;
    new client.Gauge({
      name: 'aegis_instances',
      help: 'Instances by state',
      labelNames: ['state'],
      registers: [r],
      collect() {
        const rows = source()?.rows() ?? [];
        for (const s of STATES) this.set({ state: s }, rows.filter((row) => row.state === s).length);
      },
    });
    new client.Gauge({
      name: 'aegis_pool_ready',
      help: 'Warm VMs ready in the pool',
      registers: [r],
      collect() {
        this.set(source()?.pool()?.ready ?? 0);
      },
    });
    new client.Gauge({
      name: 'aegis_pool_target',
      help: 'Warm VMs the pool keeps (0: no pool)',
      registers: [r],
      collect() {
        this.set(source()?.pool()?.target ?? 0);
      },
    });
    new client.Gauge({
      name: 'aegisd_event_loop_delay_p99_seconds',
      help: "99th percentile of the daemon's event-loop delay over the last 10-20 s",
      registers: [r],
      collect() {
        const d = source()?.loopDelay.read();
        if (d) this.set(d.p99Ms / 1000);
      },
    });
    this.perInstance();
  }

  /** The per-instance families: filled at each scrape from the source, only for instances that are up. */
  private perInstance(): void {
    const r = this.registry;
    const labelNames = ['instance', 'handle'] as const;
    const state = new client.Gauge({
      name: 'aegis_instance_state',
      help: '1 for the state the instance is in',
      labelNames: [...labelNames, 'state'],
      registers: [r],
    });
    const cpu = new client.Counter({
      name: 'aegis_instance_cpu_seconds_total',
      help: "CPU time of the instance's VMM process (user + system)",
      labelNames,
      registers: [r],
    });
    const memory = new client.Gauge({
      name: 'aegis_instance_memory_bytes',
      help: "Memory: host_pss is the VMM process's proportional set size on the host; guest_used and guest_total are what the guest reports (running instances only)",
      labelNames: [...labelNames, 'kind'],
      registers: [r],
    });
    const disk = new client.Gauge({
      name: 'aegis_instance_disk_allocated_bytes',
      help: "Bytes the instance's writable disk takes on the host (it is sparse)",
      labelNames,
      registers: [r],
    });
    const egressBytes = new client.Counter({
      name: 'aegis_instance_egress_bytes_total',
      help: 'Bytes the egress policy carried, out of and into the guest',
      labelNames: [...labelNames, 'direction'],
      registers: [r],
    });
    const egressDecisions = new client.Counter({
      name: 'aegis_instance_egress_decisions_total',
      help: 'Egress decisions (connections and DNS queries) by outcome',
      labelNames: [...labelNames, 'decision'],
      registers: [r],
    });
    this.families = { state, cpu, memory, disk, egressBytes, egressDecisions };
  }

  private families:
    | {
        state: client.Gauge<'instance' | 'handle' | 'state'>;
        cpu: client.Counter<'instance' | 'handle'>;
        memory: client.Gauge<'instance' | 'handle' | 'kind'>;
        disk: client.Gauge<'instance' | 'handle'>;
        egressBytes: client.Counter<'instance' | 'handle' | 'direction'>;
        egressDecisions: client.Counter<'instance' | 'handle' | 'decision'>;
      }
    | undefined;

  /**
   * Reads every instance once, before the text is made (prom-client's own collect callbacks
   * run concurrently, and these figures are read asynchronously). An instance that is gone
   * drops out: the families are refilled from nothing.
   */
  private async refresh(): Promise<void> {
    const f = this.families;
    if (!f || !this.source) return;
    const source = this.source;
    const rows = source.rows();
    const figures = await Promise.all(rows.map((row) => source.figures(row.id).catch(() => undefined)));
    for (const m of Object.values(f)) m.reset();
    rows.forEach((row, i) => {
      const l = { instance: row.id, handle: row.handle };
      f.state.set({ ...l, state: row.state }, 1);
      const x = figures[i];
      if (!x) return;
      if (x.cpuSeconds !== undefined) f.cpu.inc(l, x.cpuSeconds);
      if (x.hostMemoryBytes !== undefined) f.memory.set({ ...l, kind: 'host_pss' }, x.hostMemoryBytes);
      if (x.guestMemoryUsedBytes !== undefined) f.memory.set({ ...l, kind: 'guest_used' }, x.guestMemoryUsedBytes);
      if (x.guestMemoryTotalBytes !== undefined) f.memory.set({ ...l, kind: 'guest_total' }, x.guestMemoryTotalBytes);
      if (x.diskAllocatedBytes !== undefined) f.disk.set(l, x.diskAllocatedBytes);
      if (x.egressBytesOut) f.egressBytes.inc({ ...l, direction: 'out' }, x.egressBytesOut);
      if (x.egressBytesIn) f.egressBytes.inc({ ...l, direction: 'in' }, x.egressBytesIn);
      if (x.egressAllowed) f.egressDecisions.inc({ ...l, decision: 'allowed' }, x.egressAllowed);
      if (x.egressDenied) f.egressDecisions.inc({ ...l, decision: 'denied' }, x.egressDenied);
    });
  }

  /** A start reached running after `seconds`; `kind`: cold, template, pool, snapshot. */
  started(kind: string, seconds: number): void {
    this.bootSeconds.observe(seconds);
    this.boots.inc({ kind });
  }

  woke(from: 'idle-pause' | 'hibernation', seconds: number): void {
    this.wakeSeconds.observe(seconds);
    this.wakes.inc({ from });
  }

  execEnded(result: 'exited' | 'error', seconds: number): void {
    this.execSeconds.observe(seconds);
    this.execs.inc({ result });
  }

  attach(source: MetricsSource): void {
    this.source = source;
  }

  contentType(): string {
    return this.registry.contentType;
  }

  private scraping: Promise<string> | undefined;

  /** The text of a scrape; scrapes at the same time share one (a refresh resets the families). */
  text(): Promise<string> {
    this.scraping ??= this.refresh()
      .then(() => this.registry.metrics())
      .finally(() => (this.scraping = undefined));
    return this.scraping;
  }
}
