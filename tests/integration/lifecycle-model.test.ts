/**
 * The instance lifecycle under random concurrent operations and daemon crashes, checked
 * against a model. Real instances on one daemon are driven through random sequences of
 * small concurrent batches (create, stop, delete, pause, resume, restart, exec, snapshot,
 * hibernate, fork into another handle, "SIGKILL aegisd, start it again", and "wait"). After
 * every batch:
 *
 *   - every operation succeeded or failed with a code from the registry (ERROR_CODES);
 *     UNAVAILABLE only for a request in flight while the daemon was down, or an exec whose
 *     VM was ended under it (docs/design.md);
 *   - an operation alone on its instance in a batch without a crash answered what the
 *     state table says for the state the instance was in, and left the state it should;
 *   - no instance stays `starting` or `stopping` (60 s);
 *   - every QEMU process of this home belongs to exactly one listed instance that is running
 *     or paused, and each of those has exactly one.
 *
 * After a sequence everything is force-deleted and no QEMU may be left.
 *
 * Small by default (CI, about a minute). Soak: AEGIS_MODEL_RUNS=40 AEGIS_MODEL_OPS=12. The
 * seed is printed at the start; replay with AEGIS_MODEL_SEED=<seed>, and AEGIS_MODEL_PATH=<path>
 * (printed on failure) for the shrunk counterexample only. AEGIS_MODEL_BUDGET_MS bounds the
 * whole property, shrinking included; AEGIS_MODEL_NO_SHRINK=1 reports the first failure as
 * is; AEGIS_MODEL_VERBOSE=1 prints every run's trace.
 */
import { randomBytes } from 'node:crypto';
import { statSync, readFileSync } from 'node:fs';
import fc from 'fast-check';
import { describe, it } from 'vitest';
import { ERROR_CODES } from '@aegis/protocol';
import type { Instance, InstanceState } from '@aegis/client';
import { qemuProcessesFor, useDaemon, type TestDaemon } from './fixture.js';

const env = process.env;
const RUNS = Number(env['AEGIS_MODEL_RUNS'] ?? 6);
/** Operations after the first batch (which creates 1-3 instances). */
const MAX_OPS = Math.max(3, Number(env['AEGIS_MODEL_OPS'] ?? 8));
const SEED = env['AEGIS_MODEL_SEED'] !== undefined ? Number(env['AEGIS_MODEL_SEED']) : Math.floor(Math.random() * 0x7fffffff);
const REPLAY_PATH = env['AEGIS_MODEL_PATH'];
/** After this, runs not yet started pass at once: shrinking stops with the smallest failure so far. */
const BUDGET_MS = Number(env['AEGIS_MODEL_BUDGET_MS'] ?? Math.max(240_000, RUNS * MAX_OPS * 5_000));
const SETTLE_MS = 60_000;
/** AEGIS_MODEL_VERBOSE=1 prints every run's trace, not only a failing one's. */
const VERBOSE = env['AEGIS_MODEL_VERBOSE'] === '1';

/** Not hex: a handle must never resolve as an id prefix of another instance. */
const HANDLES = ['x', 'y', 'z'] as const;
type Handle = (typeof HANDLES)[number];

/** `sh -c 'sleep S; exit K'`; null: `sleep 600`. */
type Workload = { sleepS: number; exitCode: number } | null;

type Op =
  | { kind: 'create'; h: Handle; workload: Workload; delayMs: number }
  | { kind: 'stop'; h: Handle; timeoutMs: number; delayMs: number }
  | { kind: 'delete'; h: Handle; force: boolean; delayMs: number }
  | { kind: 'pause' | 'resume' | 'restart' | 'exec' | 'snapshot' | 'hibernate'; h: Handle; delayMs: number }
  /** `aegis fork h --name to`: a checkpoint of h, and a new instance `to` from it. */
  | { kind: 'fork'; h: Handle; to: Handle; delayMs: number }
  | { kind: 'crash'; delayMs: number }
  /** Time passes: what aegisd does on its own (reconnects, timeouts) gets to happen. */
  | { kind: 'wait'; delayMs: number };
type InstanceOp = Exclude<Op, { kind: 'crash' | 'wait' }>;

function isInstanceOp(op: Op): op is InstanceOp {
  return op.kind !== 'crash' && op.kind !== 'wait';
}

/** The instances an operation touches (a fork: its source and the new one). */
function handlesOf(op: InstanceOp): Handle[] {
  return op.kind === 'fork' ? [op.h, op.to] : [op.h];
}
type Batch = Op[];

// ---------------------------------------------------------------------------------------------
// Generators

/** x is always created first, y often, z seldom: most operations find an instance, some none. */
const handleArb: fc.Arbitrary<Handle> = fc.oneof(
  { weight: 3, arbitrary: fc.constant('x' as const) },
  { weight: 2, arbitrary: fc.constant('y' as const) },
  { weight: 1, arbitrary: fc.constant('z' as const) },
);
/** Delays before an operation starts within its batch: a warm boot takes ~0.6 s, a cold one (restart) seconds. */
const delayArb = fc.constantFrom(0, 150, 400, 1500, 3000);
const workloadArb: fc.Arbitrary<Workload> = fc.oneof(
  { weight: 2, arbitrary: fc.constant(null) },
  { weight: 1, arbitrary: fc.record({ sleepS: fc.constantFrom(0, 1, 4), exitCode: fc.constantFrom(0, 3) }) },
);

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('create' as const), h: handleArb, workload: workloadArb, delayMs: delayArb }) },
  {
    weight: 2,
    arbitrary: fc.record({ kind: fc.constant('stop' as const), h: handleArb, timeoutMs: fc.constantFrom(100, 1500), delayMs: delayArb }),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('delete' as const), h: handleArb, force: fc.boolean(), delayMs: delayArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('pause' as const), h: handleArb, delayMs: delayArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('resume' as const), h: handleArb, delayMs: delayArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('restart' as const), h: handleArb, delayMs: delayArb }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('exec' as const), h: handleArb, delayMs: delayArb }) },
  {
    weight: Number(env['AEGIS_MODEL_SNAPSHOT_WEIGHT'] ?? 1),
    arbitrary: fc.record({ kind: fc.constant('snapshot' as const), h: handleArb, delayMs: delayArb }),
  },
  {
    weight: Number(env['AEGIS_MODEL_HIBERNATE_WEIGHT'] ?? 2),
    arbitrary: fc.record({ kind: fc.constant('hibernate' as const), h: handleArb, delayMs: delayArb }),
  },
  {
    weight: Number(env['AEGIS_MODEL_FORK_WEIGHT'] ?? 1),
    arbitrary: fc
      .record({ h: handleArb, to: handleArb, delayMs: delayArb })
      .filter(({ h, to }) => h !== to)
      .map(({ h, to, delayMs }) => ({ kind: 'fork' as const, h, to, delayMs })),
  },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('crash' as const), delayMs: delayArb }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('wait' as const), delayMs: fc.constantFrom(1000, 5000, 16_000) }) },
);

/** Cuts `ops` into batches of `sizes[i]` (1-3) operations; a batch holds at most one crash. */
function toBatches(ops: Op[], sizes: number[]): Batch[] {
  const batches: Batch[] = [];
  let current: Batch = [];
  for (const op of ops) {
    const size = sizes[batches.length % sizes.length] ?? 1;
    if (current.length >= size || (op.kind === 'crash' && current.some((o) => o.kind === 'crash'))) {
      batches.push(current);
      current = [];
    }
    current.push(op);
  }
  if (current.length > 0) batches.push(current);
  return batches;
}

interface Sequence {
  batches: Batch[];
}

const sequenceArb: fc.Arbitrary<Sequence> = fc
  .record({
    /** The first batch creates x, then y, then z, at once. */
    initial: fc.array(workloadArb, { minLength: 1, maxLength: HANDLES.length }),
    ops: fc.array(opArb, { minLength: 3, maxLength: MAX_OPS }),
    sizes: fc.array(fc.integer({ min: 1, max: 3 }), { minLength: MAX_OPS, maxLength: MAX_OPS }),
  })
  .map(({ initial, ops, sizes }) => {
    const first: Batch = initial.map((workload, i) => ({ kind: 'create', h: HANDLES[i] ?? 'x', workload, delayMs: 0 }));
    const seq: Sequence = { batches: [first, ...toBatches(ops, sizes)] };
    return Object.assign(seq, { [fc.toStringMethod]: () => formatSequence(seq) });
  });

// ---------------------------------------------------------------------------------------------
// Formatting (for failures: the sequence reads as a list of batches)

function commandOf(w: Workload): string[] {
  return w === null ? ['sleep', '600'] : ['sh', '-c', `sleep ${w.sleepS}; exit ${w.exitCode}`];
}

function formatOp(op: Op): string {
  const delay = op.delayMs > 0 ? `+${op.delayMs}ms ` : '';
  switch (op.kind) {
    case 'create':
      return `${delay}create ${op.h} (${op.workload === null ? 'sleep 600' : `sleep ${op.workload.sleepS}; exit ${op.workload.exitCode}`})`;
    case 'stop':
      return `${delay}stop ${op.h} (timeout ${op.timeoutMs}ms)`;
    case 'delete':
      return `${delay}delete ${op.h}${op.force ? ' --force' : ''}`;
    case 'crash':
      return `${delay}SIGKILL aegisd, start it again`;
    case 'wait':
      return `wait ${op.delayMs / 1000} s`;
    case 'fork':
      return `${delay}fork ${op.h} -> ${op.to}`;
    default:
      return `${delay}${op.kind} ${op.h}`;
  }
}

function formatSequence(seq: Sequence): string {
  return '\n' + seq.batches.map((b, i) => `  batch ${i}: ${b.map(formatOp).join('  ||  ')}`).join('\n');
}

// ---------------------------------------------------------------------------------------------
// The model: what an operation alone on its instance answers, by the state it finds

type Seen = InstanceState | 'absent';
const LIVE: readonly Seen[] = ['starting', 'running', 'paused', 'stopping'];
const TRANSIENT: readonly Seen[] = ['starting', 'stopping'];
/** Codes an operation may meet when other operations on its instance run beside it. */
const CONCURRENT_CODES = ['NOT_FOUND', 'ALREADY_EXISTS', 'FAILED_PRECONDITION', 'CANCELLED'];

/**
 * What an operation alone on its instances answers; `s` is its instance's state, `target` a
 * fork's new handle's. A hibernated instance wakes for whatever needs its machine (exec,
 * snapshot, fork, hibernate, resume); pause refuses it (nothing runs to pause).
 */
function expectedOutcome(op: InstanceOp, s: Seen, target: Seen = 'absent'): string {
  if (s === 'absent') return op.kind === 'create' ? 'ok' : 'NOT_FOUND';
  const wakes = s === 'running' || s === 'hibernated';
  switch (op.kind) {
    case 'create':
      return 'ALREADY_EXISTS';
    case 'stop':
    case 'restart':
      return 'ok';
    case 'delete':
      return (LIVE.includes(s) || s === 'hibernated') && !op.force ? 'FAILED_PRECONDITION' : 'ok';
    case 'pause':
      return s === 'running' ? 'ok' : 'FAILED_PRECONDITION';
    case 'exec':
    case 'snapshot':
    case 'hibernate':
      return wakes ? 'ok' : 'FAILED_PRECONDITION';
    case 'fork':
      // A name taken is refused first, the source left as it was; then the checkpoint (which
      // wakes a hibernated source), then the new instance.
      if (target !== 'absent') return 'ALREADY_EXISTS';
      return wakes ? 'ok' : 'FAILED_PRECONDITION';
    case 'resume':
      return s === 'paused' || s === 'hibernated' ? 'ok' : 'FAILED_PRECONDITION';
  }
}

/** The state a successful operation leaves (and, for those that return one, reports). */
function expectedAfter(op: InstanceOp, s: Seen): Seen {
  switch (op.kind) {
    case 'create':
    case 'resume':
    case 'restart':
      return 'running';
    case 'stop':
      return LIVE.includes(s) || s === 'hibernated' ? 'stopped' : s;
    case 'delete':
      return 'absent';
    case 'pause':
      return 'paused';
    case 'hibernate':
      return 'hibernated';
    case 'exec':
    case 'snapshot':
    case 'fork':
      return s === 'hibernated' ? 'running' : s;
  }
}

function isShortLived(i: Instance | undefined): boolean {
  return i !== undefined && i.command[0] === 'sh';
}

/** States an instance may be in by the time an operation reaches it: a short workload may end meanwhile. */
function reachable(i: Instance | undefined): Seen[] {
  if (!i) return ['absent'];
  if (isShortLived(i) && LIVE.includes(i.state)) return [i.state, 'stopping', 'stopped'];
  return [i.state];
}

// ---------------------------------------------------------------------------------------------
// Running a sequence against the daemon

interface Result {
  op: InstanceOp;
  start: number;
  end: number;
  /** 'ok', a registry code, or 'NO_CODE'. */
  outcome: string;
  /** The state an operation returned, `exit N` for an exec, or the error's message. */
  detail: string;
}

interface Crash {
  killAt: number;
  upAt: number;
  /** How long aegisd took to answer again. */
  restartMs: number;
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function codeOf(err: unknown): string {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' && Object.hasOwn(ERROR_CODES, code) ? code : 'NO_CODE';
}

async function perform(d: TestDaemon, op: InstanceOp): Promise<string> {
  const c = d.client;
  switch (op.kind) {
    case 'create':
      return (await c.createInstance({ handle: op.h, command: commandOf(op.workload), network: 'none' })).state;
    case 'stop':
      return (await c.stopInstance(op.h, { timeoutMs: op.timeoutMs })).state;
    case 'delete':
      await c.deleteInstance(op.h, { force: op.force });
      return 'absent';
    case 'pause':
      return (await c.pauseInstance(op.h)).state;
    case 'resume':
      return (await c.resumeInstance(op.h)).state;
    case 'restart':
      return (await c.restartInstance(op.h)).state;
    case 'hibernate':
      return (await c.hibernateInstance(op.h)).state;
    case 'fork': {
      // The source's state is read back after (its fork is judged by the listing).
      await c.forkInstance(op.h, { count: 1, names: [op.to] });
      return (await c.getInstance(op.h)).state;
    }
    case 'snapshot': {
      // A checkpoint leaves its instance as it was (running): the state is read back after.
      await c.createSnapshot(op.h, { name: `model-${op.h}-${randomBytes(4).toString('hex')}` });
      return (await c.getInstance(op.h)).state;
    }
    case 'exec': {
      let exit = 'no exit event';
      for await (const ev of c.exec(op.h, { command: ['true'] })) {
        if (ev.type === 'exit') exit = `exit ${ev.exitCode ?? ev.signal}`;
      }
      return exit;
    }
  }
}

async function runOp(d: TestDaemon, op: InstanceOp): Promise<Result> {
  await sleep(op.delayMs);
  const start = Date.now();
  try {
    const detail = await perform(d, op);
    return { op, start, end: Date.now(), outcome: 'ok', detail };
  } catch (err) {
    const outcome = codeOf(err);
    const raw = (err as { code?: unknown } | null)?.code;
    const message = err instanceof Error ? err.message : String(err);
    return { op, start, end: Date.now(), outcome, detail: outcome === 'NO_CODE' ? `${message} (code: ${String(raw)})` : message };
  }
}

/** SIGKILL, then start on the same home; recovery may outlast the fixture's 20 s wait. */
async function crash(d: TestDaemon, delayMs: number): Promise<Crash> {
  await sleep(delayMs);
  const killAt = Date.now();
  await d.kill();
  try {
    await d.start();
  } catch {
    const deadline = Date.now() + 60_000;
    for (;;) {
      if (
        await d.client.status().then(
          () => true,
          () => false,
        )
      )
        break;
      if (Date.now() > deadline) throw new Error('aegisd did not answer within 80 s of being started again after SIGKILL');
      await sleep(200);
    }
  }
  const upAt = Date.now();
  return { killAt, upAt, restartMs: upAt - killAt };
}

async function listAll(d: TestDaemon): Promise<Instance[]> {
  return d.client.listInstances({ all: true });
}

/** Waits until no instance is starting or stopping; returns the listing, or the stuck ones. */
async function settle(d: TestDaemon): Promise<{ list: Instance[]; stuck: Instance[] }> {
  const deadline = Date.now() + SETTLE_MS;
  for (;;) {
    const list = await listAll(d);
    const stuck = list.filter((i) => TRANSIENT.includes(i.state));
    if (stuck.length === 0 || Date.now() > deadline) return { list, stuck };
    await sleep(250);
  }
}

interface Vmm {
  pid: number;
  id: string | undefined;
  line: string;
}

function parseVmm(home: string, line: string): Vmm {
  const pid = Number(line.trim().split(/\s+/)[0]);
  const byName = /-name aegis-([0-9a-f]{16}),/.exec(line)?.[1];
  const byPath = line.match(new RegExp(`${home.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}/instances/([0-9a-f]{16})/`))?.[1];
  return { pid, id: byName !== undefined && byName === byPath ? byName : undefined, line };
}

/**
 * Every VMM process of this home is the one VM of a listed running or paused instance, and
 * every such instance has one. Judged on instances whose state was the same before and after
 * the process listing; retried a few times so a workload ending meanwhile is not a finding.
 */
async function checkVmms(d: TestDaemon): Promise<string[]> {
  let problems: string[] = [];
  for (let attempt = 0; attempt < 6; attempt++) {
    if (attempt > 0) await sleep(500);
    const before = await listAll(d);
    const vmms = (await qemuProcessesFor(d.home)).map((l) => parseVmm(d.home, l));
    const after = new Map((await listAll(d)).map((i) => [i.id, i]));
    problems = [];
    const stable = new Map(before.filter((i) => after.get(i.id)?.state === i.state).map((i) => [i.id, i]));
    const known = new Set([...before.map((i) => i.id), ...after.keys()]);
    const perId = new Map<string, Vmm[]>();
    for (const v of vmms) {
      if (v.id === undefined) {
        problems.push(`a QEMU process whose instance cannot be told from its command line: ${v.line.slice(0, 300)}`);
        continue;
      }
      perId.set(v.id, [...(perId.get(v.id) ?? []), v]);
    }
    for (const [id, vs] of perId) {
      const pids = vs.map((v) => v.pid).join(', ');
      if (!known.has(id)) {
        problems.push(`QEMU pid ${pids} belongs to instance ${id}, which is not listed (deleted, or never recorded)`);
        continue;
      }
      const inst = stable.get(id);
      if (!inst) continue; // its state moved while we looked
      if (inst.state !== 'running' && inst.state !== 'paused' && !TRANSIENT.includes(inst.state)) {
        problems.push(`instance ${inst.handle} (${id}) is ${inst.state} but QEMU pid ${pids} still runs for it`);
      }
      if (vs.length > 1) problems.push(`instance ${inst.handle} (${id}) has ${vs.length} QEMU processes: pids ${pids}`);
    }
    for (const inst of stable.values()) {
      if ((inst.state === 'running' || inst.state === 'paused') && !perId.has(inst.id)) {
        problems.push(`instance ${inst.handle} (${inst.id}) is ${inst.state} but has no QEMU process`);
      }
    }
    if (problems.length === 0) return [];
  }
  return problems;
}

/** Force-deletes every instance; returns what went wrong. */
async function deleteAll(d: TestDaemon): Promise<string[]> {
  const problems: string[] = [];
  for (const i of await listAll(d)) {
    try {
      await d.client.deleteInstance(i.id, { force: true });
    } catch (err) {
      if (codeOf(err) !== 'NOT_FOUND')
        problems.push(`delete --force of ${i.handle} (${i.state}) failed: [${codeOf(err)}] ${(err as Error).message}`);
    }
  }
  const left = await listAll(d);
  if (left.length > 0) problems.push(`still listed after deleting everything: ${left.map((i) => `${i.handle}=${i.state}`).join(', ')}`);
  for (let i = 0; i < 20; i++) {
    const vmms = await qemuProcessesFor(d.home);
    if (vmms.length === 0) return problems;
    if (i === 19) problems.push(`QEMU still running after every instance was deleted: ${vmms.map((l) => l.slice(0, 200)).join('\n    ')}`);
    await sleep(500);
  }
  return problems;
}

function seenOf(list: Instance[]): Map<string, Instance> {
  return new Map(list.map((i) => [i.handle, i]));
}

function describeStates(list: Instance[]): string {
  return HANDLES.map((h) => {
    const i = list.find((x) => x.handle === h);
    return `${h}=${i ? `${i.state}${isShortLived(i) ? '(short)' : ''}` : 'absent'}`;
  }).join(' ');
}

/** Checks one batch's answers against the model; returns the violations. */
function judge(batch: Batch, pre: Map<string, Instance>, results: Result[], post: Map<string, Instance>, crashes: Crash[]): string[] {
  const out: string[] = [];
  const crashed = batch.some((o) => o.kind === 'crash');
  for (const r of results) {
    const { op } = r;
    const what = `${formatOp(op)} -> ${r.outcome} (${r.detail})`;
    const inKill = crashes.some((c) => r.start <= c.upAt && r.end >= c.killAt);
    // docs/design.md: an exec whose VM goes away under it (its agent channel closes) fails
    // UNAVAILABLE. That happens when a stop, delete --force or restart of its instance runs
    // beside it, or a short workload ends: the one UNAVAILABLE allowed with aegisd up.
    const needsVm = op.kind === 'exec' || op.kind === 'snapshot' || op.kind === 'hibernate' || op.kind === 'fork';
    const vmEndedUnderExec =
      needsVm &&
      (isShortLived(pre.get(op.h)) ||
        batch.some(
          (o) =>
            o !== op && isInstanceOp(o) && o.h === op.h && (o.kind === 'stop' || o.kind === 'restart' || (o.kind === 'delete' && o.force)),
        ));
    const unavailableOk = inKill || vmEndedUnderExec;
    if (r.outcome === 'NO_CODE') {
      out.push(`${what}: an error without a code from the registry`);
      continue;
    }
    if (r.outcome === 'UNAVAILABLE' && !unavailableOk) {
      out.push(`${what}: UNAVAILABLE, but aegisd was up the whole time the request was in flight and nothing ended its VM`);
      continue;
    }
    if (op.kind === 'exec' && r.outcome === 'ok' && !/^exit /.test(r.detail)) {
      out.push(`${what}: the exec stream ended with neither an exit nor an error`);
    }
    const mine = handlesOf(op);
    const solo = !crashed && batch.filter((o) => isInstanceOp(o) && handlesOf(o).some((h) => mine.includes(h))).length === 1;
    if (!solo) {
      if (r.outcome !== 'ok' && !CONCURRENT_CODES.includes(r.outcome) && !(r.outcome === 'UNAVAILABLE' && unavailableOk)) {
        out.push(`${what}: ${r.outcome} is not an answer to an operation racing others on its instance`);
      }
      continue;
    }
    const before = pre.get(op.h);
    const states = reachable(before);
    const targets = op.kind === 'fork' ? reachable(pre.get(op.to)) : ['absent' as const];
    const allowed = new Set(states.flatMap((s) => targets.map((t) => expectedOutcome(op, s, t))));
    if (vmEndedUnderExec) allowed.add('UNAVAILABLE');
    if (!allowed.has(r.outcome)) {
      out.push(`${what}: alone on ${op.h}, which was ${states.join('/')}, it should have answered ${[...allowed].join(' or ')}`);
      continue;
    }
    const after: Seen = post.get(op.h)?.state ?? 'absent';
    if (r.outcome === 'ok' && op.kind === 'delete' && after !== 'absent') {
      out.push(`${what}: deleted, yet ${op.h} is listed afterwards (${after})`);
    }
    if (op.kind === 'fork') {
      // The new instance: there with the source's workload after a fork, untouched after a refusal.
      const made = post.get(op.to);
      const was = pre.get(op.to);
      if (r.outcome === 'ok' && !made) out.push(`${what}: forked, yet ${op.to} is not listed afterwards`);
      if (r.outcome === 'ok' && made && made.command.join(' ') !== pre.get(op.h)?.command.join(' ')) {
        out.push(`${what}: ${op.to} runs ${made.command.join(' ')}, not its source's command`);
      }
      if (r.outcome === 'ok' && made && !isShortLived(made) && made.state !== 'running') {
        out.push(`${what}: ${op.to} should be running after the fork, but it is ${made.state}`);
      }
      if (r.outcome !== 'ok' && was === undefined && made) out.push(`${what}: refused, yet ${op.to} exists afterwards (${made.state})`);
    }
    const shortCreated = r.outcome === 'ok' && op.kind === 'create' && op.workload !== null;
    if (isShortLived(before) || shortCreated || states.length !== 1) continue;
    // A long-lived workload: the state is exactly predictable.
    const s = states[0] ?? 'absent';
    const want = r.outcome === 'ok' ? expectedAfter(op, s) : s;
    if (after !== want) out.push(`${what}: ${op.h} was ${s}, so it should be ${want} afterwards, but it is ${after}`);
    const reports = op.kind !== 'delete' && op.kind !== 'exec';
    if (r.outcome === 'ok' && reports && r.detail !== want) out.push(`${what}: it should have reported ${want}`);
    if (r.outcome === 'ok' && op.kind === 'exec' && r.detail !== 'exit 0') out.push(`${what}: \`true\` should exit 0`);
  }
  return out;
}

function logSince(d: TestDaemon, offset: number, maxLines = 250): string {
  let text: string;
  try {
    text = readFileSync(d.logFile).subarray(offset).toString('utf8');
  } catch {
    return '(no daemon log)';
  }
  const lines = text.split('\n');
  return lines.length > maxLines ? [`(... ${lines.length - maxLines} earlier lines)`, ...lines.slice(-maxLines)].join('\n') : text;
}

function logSize(d: TestDaemon): number {
  try {
    return statSync(d.logFile).size;
  } catch {
    return 0;
  }
}

/** A clean daemon: up, no instances, no QEMU of this home. */
async function prepare(d: TestDaemon): Promise<void> {
  if (
    !(await d.client.status().then(
      () => true,
      () => false,
    ))
  ) {
    await d.start();
  }
  for (const i of await listAll(d)) await d.client.deleteInstance(i.id, { force: true }).catch(() => undefined);
  for (const snap of await d.client.listSnapshots()) await d.client.deleteSnapshot(snap.name).catch(() => undefined);
  for (const line of await qemuProcessesFor(d.home)) {
    const pid = Number(line.trim().split(/\s+/)[0]);
    if (pid > 0) process.kill(pid, 'SIGKILL');
  }
}

let runNo = 0;

async function runSequence(d: TestDaemon, seq: Sequence): Promise<void> {
  const n = ++runNo;
  const t0 = Date.now();
  await prepare(d);
  const logStart = logSize(d);
  const trace: string[] = [];
  const fail = (problems: string[]): never => {
    // One line per failing run, shrinking included: a soak shows its progress.
    const took = ((Date.now() - t0) / 1000).toFixed(0);
    process.stdout.write(`lifecycle model: run ${n}: violated after ${took} s: ${problems[0] ?? ''}\n`);
    throw new Error(
      [
        `lifecycle model violated (run ${n}):`,
        ...problems.map((p) => `  - ${p}`),
        'trace:',
        ...trace,
        `daemon log during this run (${d.logFile}):`,
        logSince(d, logStart),
      ].join('\n'),
    );
  };
  let list = (await settle(d)).list;
  for (const [bi, batch] of seq.batches.entries()) {
    const pre = seenOf(list);
    trace.push(`  batch ${bi} from ${describeStates(list)}:`);
    const crashes: Crash[] = [];
    let crashError: unknown;
    const results = await Promise.all(
      batch.map(async (op): Promise<Result | undefined> => {
        if (isInstanceOp(op)) return runOp(d, op);
        if (op.kind === 'wait') {
          await sleep(op.delayMs);
          return undefined;
        }
        try {
          crashes.push(await crash(d, op.delayMs));
        } catch (err) {
          crashError = err;
        }
        return undefined;
      }),
    );
    const done = results.filter((r): r is Result => r !== undefined);
    for (const r of done) trace.push(`    ${formatOp(r.op)} -> ${r.outcome} ${r.detail} [${((r.end - r.start) / 1000).toFixed(1)} s]`);
    for (const op of batch) if (op.kind === 'wait') trace.push(`    ${formatOp(op)}`);
    for (const c of crashes) trace.push(`    aegisd killed and answering again after ${(c.restartMs / 1000).toFixed(1)} s`);
    if (crashError !== undefined) fail([(crashError as Error).message]);
    const settled = await settle(d);
    list = settled.list;
    trace.push(`    -> ${describeStates(list)}`);
    const problems = settled.stuck.map(
      (i) =>
        `instance ${i.handle} (${i.id}) is still ${i.state} ${SETTLE_MS / 1000} s after its batch ended (${i.stateReason ?? 'no reason'})`,
    );
    problems.push(...judge(batch, pre, done, seenOf(list), crashes));
    problems.push(...(await checkVmms(d)));
    if (problems.length > 0) fail(problems);
  }
  const cleanup = await deleteAll(d);
  if (cleanup.length > 0) fail(cleanup);
  const ops = seq.batches.reduce((a, b) => a + b.length, 0);
  const took = ((Date.now() - t0) / 1000).toFixed(0);
  process.stdout.write(`lifecycle model: run ${n}: ${seq.batches.length} batches, ${ops} ops, ok in ${took} s\n`);
  if (VERBOSE) process.stdout.write(`${trace.join('\n')}\n`);
}

// ---------------------------------------------------------------------------------------------

const daemon = useDaemon();

describe('the instance lifecycle under random concurrent operations and crashes', () => {
  it(
    'answers every operation with a registered code, settles every instance, and leaves exactly one QEMU per running or paused instance',
    async () => {
      const d = daemon();
      process.stdout.write(
        `lifecycle model: seed=${SEED} runs=${RUNS} ops<=${MAX_OPS} budget=${BUDGET_MS / 1000}s (replay: AEGIS_MODEL_SEED=${SEED})\n`,
      );
      const deadline = Date.now() + BUDGET_MS;
      let skipped = 0;
      const property = fc.asyncProperty(sequenceArb, async (seq) => {
        if (Date.now() > deadline) {
          skipped++;
          return true;
        }
        await runSequence(d, seq);
        return true;
      });
      const details = await fc.check(property, {
        numRuns: RUNS,
        seed: SEED,
        ...(REPLAY_PATH !== undefined ? { path: REPLAY_PATH } : {}),
        endOnFailure: env['AEGIS_MODEL_NO_SHRINK'] === '1',
      });
      if (skipped > 0) process.stdout.write(`lifecycle model: ${skipped} run(s) not made: time budget of ${BUDGET_MS / 1000} s spent\n`);
      if (details.failed) {
        // The report names the sequence, seed and path; the error is the failing run's trace and log.
        const cause = details.errorInstance instanceof Error ? details.errorInstance.message : String(details.errorInstance);
        throw new Error(`${fc.defaultReportMessage(details) ?? 'property failed'}\n\n${cause}`);
      }
    },
    BUDGET_MS + 240_000,
  );
});
