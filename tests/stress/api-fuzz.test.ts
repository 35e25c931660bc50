/**
 * Property-based fuzzing of aegisd's HTTP API, against a real daemon (AEGIS_WARM_BOOT=0) on
 * its unix socket: request bodies generated from the OpenAPI schemas (valid, then mutated:
 * wrong types, extra and missing fields, huge strings, NUL bytes, deep nesting, broken JSON),
 * odd paths and methods, and raw malformed HTTP (garbage request lines, bad Content-Length,
 * chunked garbage, oversized headers, pipelining, slowloris-style partial requests).
 *
 * Asserted: the daemon never dies and keeps answering /v1/status; every response with a status
 * >= 400 carries a JSON `{code, message}`; nothing is answered 500/INTERNAL (nor UNKNOWN); no
 * `.`/`..` path reaches a route; no fuzzed create starts an instance.
 *
 * No create may boot VMs by the dozen: every create body that parses as an object asks for a
 * secret that does not exist (and never `*`), which the daemon refuses before binding, pulling
 * or booting anything. The only VM is one target instance, booted once, that valid execs (of
 * `echo`) and log reads run against; all other instance requests use refs starting `nx`, which
 * can be neither its handle nor a prefix of its (hex) id.
 *
 * Needs the daemon built (`npm run build`) and the guest artifacts (`make all`). Default run
 * well under a minute; AEGIS_STRESS_RUNS=<n> raises the number of generated requests (and the
 * raw ones with it), AEGIS_STRESS_SEED=<seed> replays a run, AEGIS_STRESS_BOOT=0 skips the VM.
 */
import { mkdtempSync, readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { ROOT, TestDaemon, teardown } from '../integration/fixture.js';
import { validateBody } from '../../packages/daemon/src/api/validate.js';

const env = process.env;
const RUNS = Math.max(1, Number(env['AEGIS_STRESS_RUNS'] ?? 1500));
const RAW_RUNS = Math.max(1, Math.round(RUNS / 3));
const SEED = env['AEGIS_STRESS_SEED'] !== undefined ? Number(env['AEGIS_STRESS_SEED']) : Math.floor(Math.random() * 0x7fffffff);
const BOOT = env['AEGIS_STRESS_BOOT'] !== '0';
/** AEGIS_STRESS_VERBOSE=1 prints requests that took over 300 ms, and every failure as it happens. */
const VERBOSE = env['AEGIS_STRESS_VERBOSE'] === '1';
/** Valid execs run in the target VM: a couple, not hundreds. */
const MAX_REAL_EXECS = 6;

/** A secret name nothing ever sets: a create asking for it fails before anything is started. */
const POISON = 'AEGIS_FUZZ_NO_SUCH_SECRET';
const TARGET = 'fuzz-target';
const KNOWN_CODES = new Set([
  'INVALID_ARGUMENT',
  'NOT_FOUND',
  'ALREADY_EXISTS',
  'FAILED_PRECONDITION',
  'UNSUPPORTED',
  'TIMEOUT',
  'UNAVAILABLE',
  'RESOURCE_EXHAUSTED',
  'CANCELLED',
]);

// ---------------------------------------------------------------------------------------------
// Bodies from the OpenAPI schemas

interface Schema {
  $ref?: string;
  type?: string;
  const?: unknown;
  enum?: unknown[];
  properties?: Record<string, Schema | boolean>;
  required?: string[];
  additionalProperties?: Schema | boolean;
  propertyNames?: Schema;
  maxProperties?: number;
  items?: Schema;
  minItems?: number;
  maxItems?: number;
  minLength?: number;
  maxLength?: number;
  pattern?: string;
  minimum?: number;
  maximum?: number;
  allOf?: Schema[];
  anyOf?: Schema[];
}

const spec = JSON.parse(readFileSync(path.join(ROOT, 'spec/openapi.json'), 'utf8')) as { components: { schemas: Record<string, Schema> } };
const schemas = spec.components.schemas;

function resolve(s: Schema): Schema {
  if (s.$ref) {
    const target = schemas[s.$ref.replace('#/components/schemas/', '')];
    if (!target) throw new Error(`unresolved ${s.$ref}`);
    return resolve(target);
  }
  const [only, ...more] = s.allOf ?? [];
  if (only && more.length === 0) {
    const rest: Schema = { ...s };
    delete rest.allOf;
    return { ...resolve(only), ...rest };
  }
  return s;
}

/** Strings: what the schema allows, often, and anything at all (NUL, unicode, long), sometimes. */
function stringArb(s: Schema): fc.Arbitrary<string> {
  const max = s.maxLength ?? 64;
  const min = s.minLength ?? 0;
  const fit = (a: fc.Arbitrary<string>): fc.Arbitrary<string> => a.map((x) => x.slice(0, max)).filter((x) => x.length >= min);
  const free = fc.oneof(
    fc.string({ minLength: min, maxLength: Math.min(max, 24) }),
    fc.string({ unit: 'binary', minLength: min, maxLength: Math.min(max, 24) }),
  );
  return s.pattern ? fc.oneof({ arbitrary: fit(fc.stringMatching(new RegExp(s.pattern, 'u'))), weight: 4 }, free) : free;
}

function arbOf(schema: Schema | boolean): fc.Arbitrary<unknown> {
  if (typeof schema === 'boolean') return fc.jsonValue({ maxDepth: 2 });
  const s = resolve(schema);
  if ('const' in s) return fc.constant(s.const);
  if (s.enum) return fc.constantFrom(...s.enum);
  switch (s.type) {
    case 'string':
      return stringArb(s);
    case 'integer':
      return fc.integer({ min: s.minimum ?? -1_000_000, max: s.maximum ?? 1_000_000 });
    case 'boolean':
      return fc.boolean();
    case 'array':
      return fc.array(arbOf(s.items ?? true), {
        minLength: s.minItems ?? 0,
        maxLength: Math.min(s.maxItems ?? 4, Math.max(s.minItems ?? 0, 4)),
      });
    case 'object':
      return objectArb(s);
    default:
      return fc.jsonValue({ maxDepth: 2 });
  }
}

function objectArb(s: Schema): fc.Arbitrary<unknown> {
  if (s.additionalProperties && typeof s.additionalProperties === 'object') {
    const keys = s.propertyNames ? stringArb({ ...s.propertyNames, type: 'string' }) : fc.string();
    return fc.dictionary(keys, arbOf(s.additionalProperties), { maxKeys: Math.min(s.maxProperties ?? 4, 4) });
  }
  const props = Object.entries(s.properties ?? {});
  const record = (required: string[]): fc.Arbitrary<unknown> =>
    fc.record(Object.fromEntries(props.map(([k, v]) => [k, arbOf(v)])), {
      requiredKeys: props.map(([k]) => k).filter((k) => required.includes(k)),
    });
  // anyOf of `required` alternatives (CreateInstanceRequest: a command, an image, or both).
  const alternatives = (s.anyOf ?? []).map((a) => [...(s.required ?? []), ...(a.required ?? [])]);
  return alternatives.length > 0 ? fc.constantFrom(...alternatives).chain(record) : record(s.required ?? []);
}

// ---------------------------------------------------------------------------------------------
// Mutations

const DEEP = '\u0001AEGIS_FUZZ_DEEP\u0001';

/** Every (container, key) in a JSON value: the places a mutation can hit. */
function places(v: unknown, out: [Record<string, unknown> | unknown[], string | number][] = []): typeof out {
  if (Array.isArray(v)) {
    v.forEach((x, i) => {
      out.push([v, i]);
      places(x, out);
    });
  } else if (typeof v === 'object' && v !== null) {
    for (const [k, x] of Object.entries(v)) {
      out.push([v as Record<string, unknown>, k]);
      places(x, out);
    }
  }
  return out;
}

function set(container: Record<string, unknown> | unknown[], key: string | number, value: unknown): void {
  (container as Record<string | number, unknown>)[key] = value;
}

const wrongValue = fc.oneof(
  fc.integer(),
  fc.double({ noNaN: true, noDefaultInfinity: true }),
  fc.boolean(),
  fc.constant(null),
  fc.string({ maxLength: 8 }),
  fc.array(fc.integer(), { maxLength: 3 }),
  fc.dictionary(fc.string({ maxLength: 4 }), fc.integer(), { maxKeys: 2 }),
  fc.constant({}),
  fc.constant([]),
);

type Mutation =
  | { kind: 'none' }
  | { kind: 'wrongType'; at: number; value: unknown }
  | { kind: 'extraField'; at: number; key: string; value: unknown }
  | { kind: 'dropField'; at: number }
  | { kind: 'hugeString'; at: number; length: number; char: string }
  | { kind: 'nul'; at: number; pos: number; inKey: boolean }
  | { kind: 'deep'; at: number; depth: number; shape: 'array' | 'object' }
  | { kind: 'notAnObject'; value: unknown }
  | { kind: 'text'; how: 'truncate' | 'garbage' | 'bom' | 'badUtf8' | 'trailing' | 'empty' | 'dupKey'; pos: number; junk: string };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { arbitrary: fc.constant({ kind: 'none' as const }), weight: 4 },
  { arbitrary: fc.record({ kind: fc.constant('wrongType' as const), at: fc.nat(), value: wrongValue }), weight: 3 },
  {
    arbitrary: fc.record({ kind: fc.constant('extraField' as const), at: fc.nat(), key: fc.string({ maxLength: 12 }), value: wrongValue }),
    weight: 2,
  },
  { arbitrary: fc.record({ kind: fc.constant('dropField' as const), at: fc.nat() }), weight: 2 },
  {
    arbitrary: fc.record({
      kind: fc.constant('hugeString' as const),
      at: fc.nat(),
      length: fc.constantFrom(257, 4097, 65_537, 131_073, 1_000_000, 4_300_000),
      char: fc.constantFrom('a', 'é', '\u0000', '😀', '"'),
    }),
    weight: 2,
  },
  {
    arbitrary: fc.record({ kind: fc.constant('nul' as const), at: fc.nat(), pos: fc.nat(), inKey: fc.boolean() }),
    weight: 3,
  },
  {
    arbitrary: fc.record({
      kind: fc.constant('deep' as const),
      at: fc.nat(),
      depth: fc.constantFrom(64, 1_000, 100_000, 1_000_000),
      shape: fc.constantFrom('array' as const, 'object' as const),
    }),
    weight: 1,
  },
  { arbitrary: fc.record({ kind: fc.constant('notAnObject' as const), value: wrongValue }), weight: 1 },
  {
    arbitrary: fc.record({
      kind: fc.constant('text' as const),
      how: fc.constantFrom(
        'truncate' as const,
        'garbage' as const,
        'bom' as const,
        'badUtf8' as const,
        'trailing' as const,
        'empty' as const,
        'dupKey' as const,
      ),
      pos: fc.nat(),
      junk: fc.string({ unit: 'binary', maxLength: 8 }),
    }),
    weight: 2,
  },
);

/** The body, mutated, as text; deep nesting is spliced in as text (JSON.stringify would recurse). */
function mutate(valid: unknown, m: Mutation, guard?: (v: unknown) => unknown): Buffer {
  let v = structuredClone(valid);
  const spots = places(v);
  const pick = (at: number): [Record<string, unknown> | unknown[], string | number] | undefined => spots[at % Math.max(spots.length, 1)];
  switch (m.kind) {
    case 'wrongType': {
      const p = pick(m.at);
      if (p) set(p[0], p[1], m.value);
      else v = m.value;
      break;
    }
    case 'extraField': {
      const objects = [v, ...spots.map(([c, k]) => (c as Record<string | number, unknown>)[k])].filter(
        (x): x is Record<string, unknown> => typeof x === 'object' && x !== null && !Array.isArray(x),
      );
      const o = objects[m.at % Math.max(objects.length, 1)];
      if (o) o[m.key] = m.value;
      break;
    }
    case 'dropField': {
      const p = pick(m.at);
      if (p && !Array.isArray(p[0])) delete p[0][p[1] as string];
      else if (p) (p[0] as unknown[]).splice(p[1] as number, 1);
      break;
    }
    case 'hugeString': {
      const p = pick(m.at);
      const huge = m.char.repeat(Math.ceil(m.length / m.char.length));
      if (p) set(p[0], p[1], huge);
      else v = huge;
      break;
    }
    case 'nul': {
      const strings = spots.filter(([c, k]) => typeof (c as Record<string | number, unknown>)[k] === 'string');
      const keyed = spots.filter(([c]) => !Array.isArray(c));
      if (m.inKey && keyed.length > 0) {
        const [c, k] = keyed[m.at % keyed.length] as [Record<string, unknown>, string];
        const at = m.pos % (k.length + 1);
        c[`${k.slice(0, at)}\u0000${k.slice(at)}`] = c[k];
        delete c[k];
      } else if (strings.length > 0) {
        const [c, k] = strings[m.at % strings.length] as [Record<string | number, string>, string | number];
        const s = c[k] ?? '';
        const at = m.pos % (s.length + 1);
        c[k] = `${s.slice(0, at)}\u0000${s.slice(at)}`;
      }
      break;
    }
    case 'deep': {
      const p = pick(m.at);
      if (p) set(p[0], p[1], DEEP);
      else v = DEEP;
      break;
    }
    case 'notAnObject':
      v = m.value;
      break;
    default:
      break;
  }
  if (guard) v = guard(v);
  let text = JSON.stringify(v) ?? '';
  if (m.kind === 'deep') {
    const nested =
      m.shape === 'array' ? `${'['.repeat(m.depth)}${']'.repeat(m.depth)}` : `${'{"a":'.repeat(m.depth)}1${'}'.repeat(m.depth)}`;
    text = text.replace(JSON.stringify(DEEP), nested);
  }
  if (m.kind !== 'text') return Buffer.from(text, 'utf8');
  const at = m.pos % (text.length + 1);
  switch (m.how) {
    case 'truncate':
      return Buffer.from(text.slice(0, Math.max(0, Math.min(at, text.length - 1))), 'utf8');
    case 'garbage':
      return Buffer.from(`${text.slice(0, at)}${m.junk}${text.slice(at)}`, 'utf8');
    case 'bom':
      return Buffer.from(`\ufeff${text}`, 'utf8');
    case 'badUtf8':
      return Buffer.concat([
        Buffer.from(text.slice(0, at), 'utf8'),
        Buffer.from([0xc3, 0x28, 0xff, 0xfe, 0xed, 0xa0, 0x80]),
        Buffer.from(text.slice(at), 'utf8'),
      ]);
    case 'trailing':
      return Buffer.from(`${text} ${text}`, 'utf8');
    case 'empty':
      return Buffer.alloc(0);
    case 'dupKey':
      // A second copy of the first key with another value: JSON.parse keeps the last one.
      return Buffer.from(text.startsWith('{"') ? text.replace(/^\{("(?:[^"\\]|\\.)*"):/, '{$1:null,$1:') : text, 'utf8');
  }
}

/**
 * Makes a create body unable to start anything: an object gets the unknown secret (and loses
 * `*`, which would resolve every stored secret instead). A body whose `secrets` is not an
 * array of strings is invalid for any schema, and left as it is.
 */
function poisonCreate(v: unknown): unknown {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return v;
  const o = v as Record<string, unknown>;
  const s = o['secrets'];
  if (s === undefined) o['secrets'] = [POISON];
  else if (Array.isArray(s) && s.every((x) => typeof x === 'string')) o['secrets'] = [...s.filter((x) => x !== '*'), POISON];
  return o;
}

/** Bodies a fuzzed request must not send whatever the mutations did: checked on the final bytes. */
function safeCreate(body: Buffer): boolean {
  let v: unknown;
  try {
    v = JSON.parse(body.toString('utf8'));
  } catch {
    return true;
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) return true;
  const s = (v as Record<string, unknown>)['secrets'];
  if (Array.isArray(s) && s.every((x) => typeof x === 'string')) return s.includes(POISON) && !s.includes('*');
  return s !== undefined;
}

/** Valid pulls and imports would reach the network or read host files: point them nowhere. */
function defuse(schema: 'PullImageRequest' | 'ImportImageRequest') {
  return (v: unknown): unknown => {
    try {
      validateBody(schema, v);
    } catch {
      return v;
    }
    const o = v as Record<string, unknown>;
    return schema === 'PullImageRequest'
      ? { ...o, reference: '127.0.0.1:9/aegis-fuzz/none:1' }
      : { ...o, path: '/nonexistent/aegis-fuzz.tar', reference: o['reference'] };
  };
}

// ---------------------------------------------------------------------------------------------
// Requests

interface Case {
  method: string;
  path: string;
  body?: Buffer;
  /** Why it was sent (for failure reports). */
  what: string;
  /** A path that a normalising router would send elsewhere: must be refused. */
  traversal?: boolean;
  /** A body with a NUL byte in one of its strings or keys (or a host name to expose on): must be refused at validation. */
  nul?: boolean;
}

/** Does the JSON text hold a NUL in some string or key? Walked without recursion: bodies nest deep. */
function holdsNul(body: Buffer): boolean {
  let v: unknown;
  try {
    v = JSON.parse(body.toString('utf8'));
  } catch {
    return false;
  }
  const stack = [v];
  while (stack.length > 0) {
    const x = stack.pop();
    if (typeof x === 'string' && x.includes('\0')) return true;
    if (Array.isArray(x)) stack.push(...(x as unknown[]));
    else if (typeof x === 'object' && x !== null) {
      for (const [k, y] of Object.entries(x)) {
        if (k.includes('\0')) return true;
        stack.push(y);
      }
    }
  }
  return false;
}

/** A create exposing a port on a host *name*: refused at validation, never resolved. */
function namesAHost(body: Buffer): boolean {
  try {
    const v = JSON.parse(body.toString('utf8')) as { exposes?: { hostIp?: unknown }[] };
    return Array.isArray(v.exposes) && v.exposes.some((e) => typeof e?.hostIp === 'string' && net.isIP(e.hostIp) === 0);
  } catch {
    return false;
  }
}

/** Schemas with a string that may hold a NUL: ExecInputRequest.data (base64, decoded leniently). */
const NUL_ALLOWED = new Set(['ExecInputRequest']);

/** A ref that is not the target's handle nor a prefix of its hex id ('n' and 'x' are not hex). */
const nxRef = fc.oneof(
  fc.stringMatching(/^[a-zA-Z0-9_.-]{0,20}$/).map((s) => `nx${s}`),
  fc.string({ unit: 'binary', maxLength: 12 }).map((s) => `nx${s}`),
);
const enc = (s: string): string => encodeURIComponent(s).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);

/** Segments that mean something to a normalising URL parser. */
const trickSegment = fc.constantFrom(
  '..',
  '.',
  '%2e%2e',
  '%2E.',
  '.%2e',
  '%2e',
  '..%2f..',
  '%2f',
  '%2F..%2F',
  '%00',
  '%',
  '%zz',
  '',
  ';',
  '\\..',
  '%5c..',
);

const paths = {
  create: fc.constant('/v1/instances'),
  exec: nxRef.map((r) => `/v1/instances/${enc(r)}/exec`),
  secret: fc
    .oneof(fc.stringMatching(/^[A-Za-z_][A-Za-z0-9_]{0,40}$/), fc.string({ unit: 'binary', maxLength: 12 }))
    .filter((n) => n !== POISON)
    .map((n) => `/v1/secrets/${enc(n)}`),
};

function bodyCase(schema: string, method: string, pathArb: fc.Arbitrary<string>, guard?: (v: unknown) => unknown): fc.Arbitrary<Case> {
  const s = schemas[schema];
  if (!s) throw new Error(`no schema ${schema}`);
  return fc.tuple(pathArb, arbOf(s), mutationArb).map(([p, valid, m]) => {
    let body = mutate(valid, m, guard);
    // Text surgery can hit the poison itself (garbage inside its name): then the body goes unmutated.
    if (schema === 'CreateInstanceRequest' && !safeCreate(body)) body = mutate(valid, { kind: 'none' }, guard);
    const nul = (!NUL_ALLOWED.has(schema) && holdsNul(body)) || (schema === 'CreateInstanceRequest' && namesAHost(body));
    return { method, path: p, body, nul, what: `${schema} ${m.kind}${m.kind === 'text' ? `/${m.how}` : ''}` };
  });
}

const instanceAction = fc.constantFrom('stop', 'pause', 'resume', 'restart', 'signal');
const execAction = fc.constantFrom('signal', 'resize', 'input');
const anyMethod = fc.constantFrom('GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'HEAD', 'TRACE', 'PROPFIND', 'SEARCH');
const query = fc
  .array(
    fc.tuple(
      fc.constantFrom('tail', 'since', 'execs', 'all', 'force', 'x'),
      fc.oneof(fc.constantFrom('', '1', 'true', '-1', '1e3', 'yes'), fc.string({ maxLength: 20 })),
    ),
    { maxLength: 3 },
  )
  .map((q) => (q.length === 0 ? '' : `?${q.map(([k, v]) => `${k}=${enc(v)}`).join('&')}`));

const caseArb: fc.Arbitrary<Case> = fc.oneof(
  { arbitrary: bodyCase('CreateInstanceRequest', 'POST', paths.create, poisonCreate), weight: 8 },
  { arbitrary: bodyCase('ExecRequest', 'POST', paths.exec), weight: 5 },
  { arbitrary: bodyCase('SetSecretRequest', 'PUT', paths.secret), weight: 3 },
  {
    arbitrary: bodyCase(
      'StopRequest',
      'POST',
      nxRef.map((r) => `/v1/instances/${enc(r)}/stop`),
    ),
    weight: 1,
  },
  {
    arbitrary: bodyCase(
      'SignalRequest',
      'POST',
      nxRef.map((r) => `/v1/instances/${enc(r)}/signal`),
    ),
    weight: 1,
  },
  {
    arbitrary: bodyCase(
      'TtySize',
      'POST',
      fc.tuple(nxRef, nxRef).map(([r, e]) => `/v1/instances/${enc(r)}/execs/${enc(e)}/resize`),
    ),
    weight: 1,
  },
  {
    arbitrary: bodyCase(
      'ExecInputRequest',
      'POST',
      fc.tuple(nxRef, nxRef).map(([r, e]) => `/v1/instances/${enc(r)}/execs/${enc(e)}/input`),
    ),
    weight: 1,
  },
  { arbitrary: bodyCase('PullImageRequest', 'POST', fc.constant('/v1/images/pull'), defuse('PullImageRequest')), weight: 1 },
  { arbitrary: bodyCase('ImportImageRequest', 'POST', fc.constant('/v1/images/import'), defuse('ImportImageRequest')), weight: 1 },
  { arbitrary: paths.secret.map((p) => ({ method: 'DELETE', path: p, what: 'delete secret' })), weight: 1 },
  {
    arbitrary: fc
      .tuple(nxRef, instanceAction, fc.constantFrom('GET', 'POST', 'DELETE'))
      .map(([r, a, m]) => ({ method: m, path: `/v1/instances/${enc(r)}/${a}`, what: 'action' })),
    weight: 1,
  },
  {
    arbitrary: fc
      .tuple(nxRef, nxRef, execAction)
      .map(([r, e, a]) => ({ method: 'POST', path: `/v1/instances/${enc(r)}/execs/${enc(e)}/${a}`, what: 'exec action, no body' })),
    weight: 1,
  },
  {
    arbitrary: fc.tuple(nxRef, query).map(([r, q]) => ({ method: 'GET', path: `/v1/instances/${enc(r)}/logs${q}`, what: 'logs' })),
    weight: 1,
  },
  {
    arbitrary: fc
      .tuple(fc.oneof(nxRef, fc.constant(TARGET)), query)
      .map(([r, q]) => ({ method: 'GET', path: `/v1/instances/${enc(r)}${q}`, what: 'get instance' })),
    weight: 1,
  },
  {
    arbitrary: fc
      .tuple(nxRef, fc.boolean())
      .map(([r, f]) => ({ method: 'DELETE', path: `/v1/instances/${enc(r)}${f ? '?force=true' : ''}`, what: 'delete instance' })),
    weight: 1,
  },
  {
    arbitrary: fc
      .tuple(fc.constantFrom('GET', 'DELETE'), fc.string({ unit: 'binary', maxLength: 30 }))
      .map(([m, r]) => ({ method: m, path: `/v1/images/${enc(`nx${r}`)}`, what: 'image ref' })),
    weight: 1,
  },
  {
    // Wrong or unknown methods on known paths (never a POST to /v1/shutdown).
    arbitrary: fc
      .tuple(
        anyMethod,
        fc.constantFrom(
          '/v1/status',
          '/v1/instances',
          '/v1/secrets',
          '/v1/images',
          '/v1/images/pull',
          '/v1/instances/nx1/exec',
          '/v1/shutdown',
        ),
      )
      .filter(([m, p]) => !(p === '/v1/shutdown' && m === 'POST'))
      .map(([m, p]) => ({ method: m, path: p, what: 'method' })),
    weight: 2,
  },
  {
    // Paths a normalising router would have sent to another route.
    arbitrary: fc
      .tuple(
        fc.constantFrom('/v1/instances/nx', '/v1/instances/nx/logs', '/v1/secrets', '/v1/images', '/v1'),
        fc.array(fc.constantFrom('..', '%2e%2e', '.%2E', '%2E.', '.', '%2e'), { minLength: 1, maxLength: 4 }),
        fc.constantFrom('status', 'secrets', 'instances', 'images'),
      )
      .map(([base, dots, to]) => ({ method: 'GET', path: `${base}/${dots.join('/')}/${to}`, what: 'traversal', traversal: true })),
    weight: 2,
  },
  {
    // Random paths made of odd segments.
    arbitrary: fc
      .tuple(
        fc.array(fc.oneof(trickSegment, fc.stringMatching(/^[a-z0-9]{1,8}$/), nxRef.map(enc)), { maxLength: 6 }),
        fc.constantFrom('GET', 'POST', 'DELETE', 'PUT'),
      )
      .map(([segs, m]) => ({ method: m, path: `/v1/${segs.join('/')}`, what: 'odd path' }))
      .filter((c) => !/shutdown/i.test(c.path)),
    weight: 2,
  },
);

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
}

/** Bodies over this go out piece by piece, watching for an early answer (see sendLarge). */
const LARGE = 256 * 1024;

function send(socketPath: string, c: { method: string; path: string; body?: Buffer | undefined }, timeoutMs = 30_000): Promise<Answer> {
  if (c.body && c.body.length > LARGE) return sendLarge(socketPath, { ...c, body: c.body }, timeoutMs);
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        socketPath,
        method: c.method,
        path: c.path,
        agent: false,
        signal: AbortSignal.timeout(timeoutMs),
        headers: c.body ? { 'content-type': 'application/json' } : {},
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(c.body);
  });
}

/**
 * A large body, as curl sends one: in pieces, stopping at the first byte of an answer. aegisd
 * answers some requests before reading their body (413 from Content-Length, a bad path
 * parameter) and then closes; node's client, still writing, would see EPIPE instead of it.
 */
function sendLarge(socketPath: string, c: { method: string; path: string; body: Buffer }, timeoutMs: number): Promise<Answer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let answered = false;
    let wake = (): void => undefined;
    const s = net.connect(socketPath);
    const finish = (err?: Error): void => {
      clearTimeout(timer);
      s.destroy();
      const [r] = parseResponses(Buffer.concat(chunks));
      if (r) resolve({ status: r.status, headers: r.headers, text: r.text });
      else reject(err ?? new Error('connection closed without an answer'));
    };
    const timer = setTimeout(() => finish(new Error('timeout')), timeoutMs);
    s.on('data', (d: Buffer) => {
      chunks.push(d);
      answered = true;
      wake();
    });
    s.on('close', () => finish());
    s.on('error', (err) => finish(err));
    s.on('connect', () => {
      void (async () => {
        s.write(
          `${c.method} ${c.path} HTTP/1.1\r\nHost: aegisd\r\nContent-Type: application/json\r\n` +
            `Content-Length: ${c.body.length}\r\nConnection: close\r\n\r\n`,
        );
        for (let off = 0; off < c.body.length && !answered && !s.destroyed; off += 64 * 1024) {
          if (!s.write(c.body.subarray(off, off + 64 * 1024))) {
            await new Promise<void>((r) => {
              wake = r;
              s.once('drain', r);
              s.once('close', r);
            });
          }
        }
      })();
    });
  });
}

/** What is wrong with an answer, if anything: a missing code, a 500, an INTERNAL stream error. */
function problems(method: string, a: { status: number; headers: Record<string, string | string[] | undefined>; text: string }): string[] {
  const out: string[] = [];
  if (a.status >= 500 && a.status !== 501 && a.status !== 503 && a.status !== 504) out.push(`status ${a.status}`);
  if (a.status >= 400 && method !== 'HEAD') {
    let body: unknown;
    try {
      body = JSON.parse(a.text);
    } catch {
      body = undefined;
    }
    const b = body as { code?: unknown; message?: unknown } | undefined;
    if (typeof b?.code !== 'string' || typeof b.message !== 'string')
      out.push(`no JSON code (status ${a.status}): ${a.text.slice(0, 120)}`);
    else if (!KNOWN_CODES.has(b.code)) out.push(`code ${b.code}: ${b.message.slice(0, 200)}`);
    if (!String(a.headers['content-type'] ?? '').startsWith('application/json')) out.push(`status ${a.status} without a JSON content-type`);
  }
  if (a.status === 200 && String(a.headers['content-type'] ?? '').startsWith('application/x-ndjson')) {
    for (const line of a.text.split('\n')) {
      if (line === '') continue;
      try {
        const ev = JSON.parse(line) as { type?: string; code?: string; message?: string };
        if (ev.type === 'error' && !KNOWN_CODES.has(ev.code ?? '')) out.push(`stream error ${ev.code}: ${ev.message?.slice(0, 200)}`);
      } catch {
        out.push(`stream line is not JSON: ${line.slice(0, 120)}`);
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP

interface RawCase {
  what: string;
  /** Written in order, with `gapMs` between pieces. */
  pieces: Buffer[];
  gapMs: number;
  /** After writing: half-close (the server then sees EOF), or vanish (destroy, as slowloris gives up). */
  finish: 'end' | 'destroy';
}

interface RawResponse {
  status: number;
  headers: Record<string, string>;
  text: string;
}

/** The HTTP/1.1 responses in a byte stream (content-length, chunked or until close). */
function parseResponses(data: Buffer): RawResponse[] {
  const out: RawResponse[] = [];
  let rest = data;
  while (rest.length > 0) {
    const end = rest.indexOf('\r\n\r\n');
    if (end === -1) break;
    const [statusLine = '', ...lines] = rest.subarray(0, end).toString('latin1').split('\r\n');
    const headers: Record<string, string> = {};
    for (const l of lines) {
      const i = l.indexOf(':');
      if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine)?.[1] ?? 0);
    rest = rest.subarray(end + 4);
    let body: Buffer;
    if (status < 200 && status >= 100) {
      body = Buffer.alloc(0);
    } else if (headers['content-length'] !== undefined) {
      const n = Number(headers['content-length']);
      body = rest.subarray(0, n);
      rest = rest.subarray(n);
    } else if (headers['transfer-encoding'] === 'chunked') {
      const parts: Buffer[] = [];
      for (;;) {
        const eol = rest.indexOf('\r\n');
        if (eol === -1) break;
        const size = parseInt(rest.subarray(0, eol).toString('latin1'), 16);
        rest = rest.subarray(eol + 2);
        if (!(size > 0)) {
          rest = rest.subarray(Math.max(0, rest.indexOf('\r\n') + 2));
          break;
        }
        parts.push(rest.subarray(0, size));
        rest = rest.subarray(size + 2);
      }
      body = Buffer.concat(parts);
    } else {
      body = rest;
      rest = Buffer.alloc(0);
    }
    out.push({ status, headers, text: body.toString('utf8') });
  }
  return out;
}

function rawExchange(socketPath: string, c: RawCase, timeoutMs = 3_000): Promise<{ responses: RawResponse[]; timedOut: boolean }> {
  return new Promise((resolve) => {
    const chunks: Buffer[] = [];
    const s = net.connect(socketPath);
    let timedOut = false;
    let settled = false;
    const done = (): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      s.destroy();
      resolve({ responses: parseResponses(Buffer.concat(chunks)), timedOut });
    };
    const timer = setTimeout(() => {
      timedOut = true;
      done();
    }, timeoutMs);
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('close', done);
    s.on('error', done);
    s.on('connect', () => {
      void (async () => {
        for (const [i, p] of c.pieces.entries()) {
          if (s.destroyed) return;
          if (i > 0 && c.gapMs > 0) await new Promise((r) => setTimeout(r, c.gapMs));
          s.write(p);
        }
        if (c.finish === 'end') s.end();
        else setTimeout(done, 20);
      })();
    });
  });
}

const CRLF = '\r\n';
const okBody = JSON.stringify({ command: [], secrets: [POISON] });
const rawPath = fc.constantFrom(
  '/v1/status',
  '/v1/instances',
  '/v1/secrets',
  '/v1/images',
  '/v1/instances/nx1',
  '/v1/instances/../status',
  '/v1/nope',
  '*',
  'http://x/v1/status',
);
const rawHeaderValue = fc.oneof(fc.string({ maxLength: 12 }), fc.string({ unit: 'binary-ascii', maxLength: 12 }));

const rawCaseArb: fc.Arbitrary<RawCase> = fc.oneof(
  // Garbage request lines.
  fc
    .uint8Array({ minLength: 1, maxLength: 200 })
    .map((b) => ({ what: 'garbage bytes', pieces: [Buffer.from(b), Buffer.from(CRLF + CRLF)], gapMs: 0, finish: 'end' as const })),
  fc
    .tuple(
      fc.stringMatching(/^[A-Z]{1,12}$/),
      rawPath,
      fc.constantFrom('HTTP/1.1', 'HTTP/1.0', 'HTTP/2.0', 'HTTP/1.1 extra', 'http/1.1', ''),
    )
    .filter(([m]) => m !== 'HEAD' && m !== 'CONNECT')
    .map(([m, p, v]) => ({
      what: `request line ${m} ${p} ${v}`,
      pieces: [Buffer.from(`${m} ${p} ${v}${CRLF}Host: x${CRLF}${CRLF}`)],
      gapMs: 0,
      finish: 'end' as const,
    })),
  fc
    .string({ unit: 'binary-ascii', maxLength: 80 })
    .map((line) => ({ what: 'ascii request line', pieces: [Buffer.from(`${line}${CRLF}${CRLF}`)], gapMs: 0, finish: 'end' as const })),
  // Bad Content-Length: unparsable, conflicting, more than sent.
  fc
    .tuple(fc.constantFrom('-1', 'abc', '1e3', ' 5', '99999999999999999999', '5, 6', '0x10', '', '4194305', '100'), fc.boolean())
    .map(([cl, twice]) => ({
      what: `content-length ${cl}${twice ? ' twice' : ''}`,
      pieces: [
        Buffer.from(
          `POST /v1/instances HTTP/1.1${CRLF}Host: x${CRLF}Content-Length: ${cl}${CRLF}${twice ? `Content-Length: 3${CRLF}` : ''}${CRLF}${okBody}`,
        ),
      ],
      gapMs: 0,
      finish: 'end' as const,
    })),
  // Chunked garbage, and chunked mixed with Content-Length or odd codings.
  fc
    .tuple(
      fc.constantFrom('chunked', 'chunked, identity', 'xchunked', 'identity, chunked', 'gzip, chunked'),
      fc.oneof(
        fc.constantFrom(
          'zz\r\n{}\r\n0\r\n\r\n',
          'ffffffffffffffffff\r\n',
          '5\r\n{}\r\n0\r\n\r\n',
          '2;' + 'x'.repeat(20_000) + '\r\n{}\r\n0\r\n\r\n',
          '-1\r\n\r\n',
          '2\r\n{}0\r\n\r\n',
        ),
        fc.string({ unit: 'binary-ascii', maxLength: 40 }),
      ),
      fc.boolean(),
    )
    .map(([te, body, withCl]) => ({
      what: `transfer-encoding ${te}${withCl ? ' + content-length' : ''}`,
      pieces: [
        Buffer.from(
          `POST /v1/instances HTTP/1.1${CRLF}Host: x${CRLF}Transfer-Encoding: ${te}${CRLF}${withCl ? `Content-Length: 2${CRLF}` : ''}${CRLF}${body}`,
        ),
      ],
      gapMs: 0,
      finish: 'end' as const,
    })),
  // Odd headers: NUL, obs-fold, no colon, huge, many; Expect; Upgrade.
  fc
    .tuple(
      fc.constantFrom(
        'X-Nul: a\u0000b',
        'X-Fold: a\r\n b',
        'NoColon',
        ': empty',
        `X-Big: ${'a'.repeat(70_000)}`,
        'Expect: 100-continue',
        'Expect: nonsense',
        'Upgrade: websocket\r\nConnection: Upgrade',
        'Host: a\r\nHost: b',
      ),
      rawHeaderValue,
      fc.constantFrom('GET', 'POST'),
    )
    .map(([h, v, m]) => ({
      what: `header ${h.slice(0, 24)}`,
      pieces: [
        Buffer.from(
          `${m} /v1/instances HTTP/1.1${CRLF}Host: x${CRLF}${h}${CRLF}X-Fuzz: ${v.replace(/[\r\n]/g, '')}${CRLF}Content-Length: ${okBody.length}${CRLF}${CRLF}${okBody}`,
          'latin1',
        ),
      ],
      gapMs: 0,
      finish: 'end' as const,
    })),
  fc.integer({ min: 10, max: 3_000 }).map((n) => ({
    what: `${n} headers`,
    pieces: [Buffer.from(`GET /v1/status HTTP/1.1${CRLF}${Array.from({ length: n }, (_, i) => `X-H${i}: v${CRLF}`).join('')}${CRLF}`)],
    gapMs: 0,
    finish: 'end' as const,
  })),
  // Pipelined: good requests around a bad one.
  fc.constantFrom('GARBAGE', 'GET /v1/../status HTTP/1.1', 'PUT /v1/status HTTP/1.1', 'GET /v1/nope HTTP/1.1').map((bad) => ({
    what: `pipelined around ${bad}`,
    pieces: [
      Buffer.from(
        `GET /v1/status HTTP/1.1${CRLF}Host: x${CRLF}${CRLF}${bad}${CRLF}Host: x${CRLF}${CRLF}GET /v1/secrets HTTP/1.1${CRLF}Host: x${CRLF}${CRLF}`,
      ),
    ],
    gapMs: 0,
    finish: 'end' as const,
  })),
  // Slowloris-style: a request trickled in, then given up on (destroy) or cut (end).
  fc
    .tuple(fc.integer({ min: 1, max: 40 }), fc.constantFrom('end' as const, 'destroy' as const), fc.integer({ min: 0, max: 8 }))
    .map(([cut, finish, gapMs]) => {
      const full = `POST /v1/instances HTTP/1.1${CRLF}Host: x${CRLF}Content-Type: application/json${CRLF}Content-Length: ${okBody.length}${CRLF}${CRLF}${okBody}`;
      const partial = Buffer.from(full.slice(0, Math.max(1, Math.floor((full.length * cut) / 41))), 'latin1');
      // At most 24 pieces a few ms apart: read by the server in many reads, yet quick enough to run by the hundred.
      const step = Math.ceil(partial.length / 24);
      const pieces = Array.from({ length: Math.ceil(partial.length / step) }, (_, i) => partial.subarray(i * step, (i + 1) * step));
      return { what: `slowloris ${partial.length}B ${finish}`, pieces, gapMs, finish };
    }),
);

// ---------------------------------------------------------------------------------------------

describe('aegisd API fuzz', () => {
  it(
    'survives generated and malformed requests: no crash, a JSON code on every error, no INTERNAL',
    async () => {
      const daemon = new TestDaemon(mkdtempSync('/tmp/aegis-fuzz-'), { AEGIS_WARM_BOOT: '0' });
      const socketPath = path.join(daemon.home, 'aegisd.sock');
      const failures: string[] = [];
      const fail = (what: string, why: string): void => {
        if (VERBOSE) process.stdout.write(`FAIL ${what}: ${why}\n`);
        if (failures.length < 50) failures.push(`${what}: ${why}`);
      };
      let requests = 0;
      let raws = 0;
      let crashes = 0;
      let withoutCode = 0;
      let noAnswer = 0;
      const statuses = new Map<number, number>();
      const alive = async (): Promise<boolean> => {
        const pid = daemon.pid;
        try {
          if (pid === undefined) return false;
          process.kill(pid, 0);
          return (await send(socketPath, { method: 'GET', path: '/v1/status' }, 10_000)).status === 200;
        } catch {
          return false;
        }
      };
      const check = (
        what: string,
        method: string,
        a: { status: number; headers: Record<string, string | string[] | undefined>; text: string },
      ): void => {
        statuses.set(a.status, (statuses.get(a.status) ?? 0) + 1);
        for (const p of problems(method, a)) {
          if (p.startsWith('no JSON code')) withoutCode++;
          fail(what, p);
        }
      };
      let realExecs = 0;
      let anyFailed = true;
      process.stdout.write(`api fuzz: seed ${SEED} (AEGIS_STRESS_SEED=${SEED} replays it), ${RUNS} generated, ${RAW_RUNS} raw\n`);
      await daemon.start();
      try {
        // The one VM: valid execs and log reads need an instance to reach.
        if (BOOT) {
          const created = await send(socketPath, {
            method: 'POST',
            path: '/v1/instances',
            body: Buffer.from(
              JSON.stringify({ command: ['sleep', '600'], handle: TARGET, memoryMiB: 256, network: 'none', autoRemove: true }),
            ),
          });
          expect(created.status, created.text).toBe(201);
        }

        await fc.assert(
          fc.asyncProperty(caseArb, async (c) => {
            if (c.method === 'POST' && c.path === '/v1/instances' && c.body && !safeCreate(c.body))
              throw new Error('fuzzer bug: an unpoisoned create');
            requests++;
            let a: Answer;
            const t0 = Date.now();
            try {
              a = await send(socketPath, c);
              if (VERBOSE && Date.now() - t0 > 300)
                process.stdout.write(`slow ${c.what} ${c.method} ${c.path.slice(0, 60)} ${Date.now() - t0}ms\n`);
            } catch (err) {
              const code = (err as NodeJS.ErrnoException).code ?? '';
              fail(c.what, `no answer (${code || String(err)})`);
              noAnswer++;
              if (VERBOSE)
                process.stdout.write(
                  `unanswered ${c.what} ${c.method} ${c.path.slice(0, 60)} ${c.body?.length ?? 0}B: ${code || String(err)}\n`,
                );
              if (!(await alive())) {
                crashes++;
                throw new Error(`aegisd died after ${c.method} ${c.path.slice(0, 100)} (${c.what})`);
              }
              return;
            }
            check(`${c.what}: ${c.method} ${c.path.slice(0, 100)}`, c.method, a);
            if (c.traversal && a.status < 400) fail(c.what, `${c.path} was routed (status ${a.status})`);
            // Refused as invalid, or never routed (PUT /v1/secrets/ with an empty name): never past validation.
            const refused = a.status === 400 || a.status === 413 || (a.status === 404 && a.text.includes('no such endpoint'));
            if (c.nul && !refused)
              fail(c.what, `a NUL byte or host name got past validation (status ${a.status}): ${a.text.slice(0, 200)}`);
            if (c.path === '/v1/instances' && c.method === 'POST' && a.status < 300)
              fail(c.what, `a fuzzed create started an instance: ${a.text.slice(0, 200)}`);
            if (requests % 100 === 0 && !(await alive())) {
              crashes++;
              throw new Error('aegisd stopped answering /v1/status');
            }
          }),
          { numRuns: RUNS, seed: SEED, endOnFailure: true },
        );

        // Execs that pass validation, run for real in the target (argv[0] is always echo).
        if (BOOT) {
          const execArb = fc.tuple(arbOf(schemas['ExecRequest'] ?? {}), fc.boolean());
          for (const [valid, keepEnv] of fc.sample(execArb, { numRuns: MAX_REAL_EXECS, seed: SEED })) {
            const req = { ...(valid as Record<string, unknown>) };
            delete req['stdin'];
            delete req['tty'];
            if (!keepEnv) delete req['env'];
            req['command'] = ['echo', ...(req['command'] as string[])];
            requests++;
            realExecs++;
            const a = await send(socketPath, {
              method: 'POST',
              path: `/v1/instances/${TARGET}/exec`,
              body: Buffer.from(JSON.stringify(req)),
            }).catch((err: Error) => ({ status: 0, headers: {}, text: err.message }));
            if (a.status === 0) fail('real exec', `no answer: ${a.text}`);
            else check(`real exec ${JSON.stringify(req).slice(0, 100)}`, 'POST', a);
          }
          for (const q of ['', '?tail=5', '?since=0&execs=true', '?tail=abc', '?follow=maybe']) {
            requests++;
            check(`logs${q}`, 'GET', await send(socketPath, { method: 'GET', path: `/v1/instances/${TARGET}/logs${q}` }));
          }
        }

        // Raw HTTP, one connection each.
        await fc.assert(
          fc.asyncProperty(rawCaseArb, async (c) => {
            raws++;
            const t0 = Date.now();
            const { responses, timedOut } = await rawExchange(socketPath, c);
            if (VERBOSE && Date.now() - t0 > 300) process.stdout.write(`slow raw ${c.what} ${Date.now() - t0}ms timedOut=${timedOut}\n`);
            for (const r of responses) check(`raw ${c.what}`, 'raw', r);
            if (raws % 100 === 0 && !(await alive())) {
              crashes++;
              throw new Error(`aegisd stopped answering /v1/status (after raw ${c.what})`);
            }
          }),
          { numRuns: RAW_RUNS, seed: SEED, endOnFailure: true },
        );

        // Slowloris proper: many connections holding partial headers; the daemon still answers.
        const held = await Promise.all(
          Array.from(
            { length: 64 },
            () =>
              new Promise<net.Socket>((resolve) => {
                const s = net.connect(socketPath, () => {
                  s.write(`GET /v1/status HTTP/1.1${CRLF}Host: x${CRLF}X-Slow: `);
                  resolve(s);
                });
                s.on('error', () => undefined);
              }),
          ),
        );
        raws += held.length;
        if (!(await alive())) fail('slowloris', '/v1/status unanswered while 64 partial requests are held');
        for (const s of held) s.destroy();

        if (!(await alive())) crashes++;
        expect(failures).toEqual([]);
        expect(crashes).toBe(0);
        anyFailed = false;
      } finally {
        const top = [...statuses.entries()].sort((x, y) => y[1] - x[1]).map(([s, n]) => `${s}×${n}`);
        process.stdout.write(
          `api fuzz: ${requests} requests, ${raws} raw, ${crashes} crashes, ${withoutCode} without a code` +
            ` (${realExecs} execs in a VM, ${noAnswer} unanswered, ${failures.length} failures, statuses ${top.join(' ')})\n`,
        );
        await teardown(daemon, anyFailed);
      }
    },
    // No project config sets a timeout for tests/stress: the test carries its own.
    Math.max(180_000, RUNS * 100),
  );
});
