/**
 * The guest parsers the host relies on (@aegis/protocol guest.ts, driven by
 * spec/guest-rpc.schema.json through its own small interpreter) checked against a real JSON
 * Schema validator: ajv compiles the same schema, and the two must agree on every sample and
 * every mutation of it. Here, not in the protocol package, because ajv is the daemon's. Two
 * rules only the parsers hold are left out: `contentEncoding: base64` (an annotation to ajv)
 * and the stats result's memAvailableKiB ≤ memTotalKiB; protocol's tests cover both.
 */
import { readFileSync } from 'node:fs';
import { Ajv2020 } from 'ajv/dist/2020.js';
import { describe, expect, it } from 'vitest';
import { parseEvent, parseParams, parseResult } from '@aegis/protocol';

const schema = JSON.parse(readFileSync(new URL('../../../spec/guest-rpc.schema.json', import.meta.url), 'utf8')) as {
  methods: Record<string, unknown>;
  events: Record<string, unknown>;
};

const ajv = new Ajv2020({ strict: true, strictTypes: false, allErrors: true });
// Ours, not JSON Schema's: the parsers' error text, and the document's own table of contents.
for (const keyword of ['x-message', 'version', 'methods', 'events']) ajv.addKeyword(keyword);
ajv.addSchema(schema, 'guest');

const pointer = (...parts: string[]): string => `guest#/${parts.join('/')}`;

/** Valid messages of each kind, as the harness and the daemon send them. */
const SAMPLES: { kind: string; ref: string; parse: (v: unknown) => unknown; good: Record<string, unknown> }[] = [
  {
    kind: 'run params',
    ref: pointer('methods', 'run', 'params'),
    parse: parseParams.run,
    good: { command: ['sh', '-c', 'x'], env: { A: 'b' }, workdir: '/w', user: 'app', stdin: true, tty: { rows: 5, cols: 6 }, image: {} },
  },
  { kind: 'exec params', ref: pointer('methods', 'exec', 'params'), parse: parseParams.exec, good: { execId: 'e1', command: ['id'] } },
  {
    kind: 'signal params',
    ref: pointer('methods', 'signal', 'params'),
    parse: parseParams.signal,
    good: { signal: 'SIGTERM', group: true },
  },
  {
    kind: 'resize params',
    ref: pointer('methods', 'resize', 'params'),
    parse: parseParams.resize,
    good: { execId: 'e', rows: 1, cols: 2 },
  },
  { kind: 'stdin params', ref: pointer('methods', 'stdin', 'params'), parse: parseParams.stdin, good: { execId: 'e', eof: true } },
  {
    kind: 'fresh params',
    ref: pointer('methods', 'fresh', 'params'),
    parse: parseParams.fresh,
    good: { timeMs: 1, hostname: 'web-1', entropy: 'x' },
  },
  { kind: 'shutdown params', ref: pointer('methods', 'shutdown', 'params'), parse: parseParams.shutdown, good: { timeoutMs: 5 } },
  { kind: 'run result', ref: pointer('methods', 'run', 'result'), parse: parseResult.run, good: { pid: 7, startedAtMs: 1 } },
  { kind: 'exec result', ref: pointer('methods', 'exec', 'result'), parse: parseResult.exec, good: { pid: 8 } },
  {
    kind: 'health result',
    ref: pointer('methods', 'health', 'result'),
    parse: parseResult.health,
    good: { version: 1, uptimeMs: 2, workload: { pid: 3, running: false } },
  },
  {
    kind: 'ps result',
    ref: pointer('methods', 'ps', 'result'),
    parse: parseResult.ps,
    good: {
      processes: [{ pid: 7, ppid: 1, uid: 0, state: 'S', rssKiB: 1, cpuMs: 2, startedAfterBootMs: 3, command: 'sleep 1' }],
      truncated: true,
    },
  },
  { kind: 'signal result', ref: pointer('methods', 'signal', 'result'), parse: parseResult.signal, good: {} },
  { kind: 'ready', ref: pointer('events', 'ready', 'params'), parse: parseEvent.ready, good: { version: 1 } },
  {
    kind: 'exit',
    ref: pointer('events', 'exit', 'params'),
    parse: parseEvent.exit,
    good: { exitCode: null, signal: 'SIGKILL', bytes: { stdout: 1, stderr: 0 }, truncated: true },
  },
  {
    kind: 'execExit',
    ref: pointer('events', 'execExit', 'params'),
    parse: parseEvent.execExit,
    good: { execId: 'e', exitCode: 0, signal: null, durationMs: 4 },
  },
];

/** What each field is replaced by: every JSON type, bounds' edges, and strings of each shape. */
const VALUES: unknown[] = [
  null,
  true,
  false,
  0,
  -1,
  1,
  255,
  256,
  1.5,
  '',
  'x',
  'SIGINT',
  'sig',
  'x'.repeat(200),
  [],
  ['a'],
  [1],
  {},
  { a: 1 },
];

/** Every variant of `good` one step away: a field replaced, removed, or added, at any depth. */
function mutations(good: unknown): unknown[] {
  if (Array.isArray(good)) return good.flatMap((e, i) => mutations(e).map((m) => good.map((x, j) => (j === i ? m : x))));
  if (typeof good !== 'object' || good === null) return VALUES;
  const o = good as Record<string, unknown>;
  const out: unknown[] = [{ ...o, unknownField: 1 }];
  for (const [k, v] of Object.entries(o)) {
    out.push(Object.fromEntries(Object.entries(o).filter(([key]) => key !== k)));
    for (const m of mutations(v)) out.push({ ...o, [k]: m });
  }
  return out;
}

const accepts = (parse: (v: unknown) => unknown, v: unknown): boolean => {
  try {
    parse(v);
    return true;
  } catch {
    return false;
  }
};

describe('the guest parsers agree with ajv on spec/guest-rpc.schema.json', () => {
  it('the schema is valid JSON Schema 2020-12 (ajv compiles every method and event)', () => {
    for (const [m] of Object.entries(schema.methods)) {
      expect(ajv.getSchema(pointer('methods', m, 'params')), m).toBeDefined();
      expect(ajv.getSchema(pointer('methods', m, 'result')), m).toBeDefined();
    }
    for (const [e] of Object.entries(schema.events)) expect(ajv.getSchema(pointer('events', e, 'params')), e).toBeDefined();
  });

  it('each sample and every one-step mutation of it is accepted by both or refused by both', () => {
    let compared = 0;
    for (const s of SAMPLES) {
      const validate = ajv.getSchema(s.ref);
      if (!validate) throw new Error(`no schema at ${s.ref}`);
      expect(validate(s.good), `${s.kind}: ${ajv.errorsText(validate.errors)}`).toBe(true);
      expect(accepts(s.parse, s.good), s.kind).toBe(true);
      for (const m of mutations(s.good)) {
        expect(accepts(s.parse, m), `${s.kind} ${JSON.stringify(m)}`).toBe(validate(m));
        compared++;
      }
    }
    expect(compared).toBeGreaterThan(900);
  });
});
