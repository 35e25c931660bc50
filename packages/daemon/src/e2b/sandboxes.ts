/**
 * E2B's REST control plane (the API the `e2b` SDK reaches at E2B_API_URL) as operations of the
 * instance manager: a sandbox is an ordinary instance running `sleep infinity`, made, listed
 * and ended by the same calls `aegis` makes (POST /v1/instances, GET /v1/instances, …), so
 * `aegis ps` shows it and every verb of the CLI works on it. The pure translations are
 * exported for unit tests.
 */
import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import type { CreateRequest, InstanceView } from '../instances/spec.js';
import { validateBody } from '../api/validate.js';
import type { E2bKeys } from './keys.js';

/** What we tell the SDK envd is: 0.5.7 and later take octet-stream uploads and close stdin. */
export const ENVD_VERSION = '0.5.7';
/** E2B's default sandbox life when `timeoutMs` is not given (its documentation: 5 minutes). */
export const DEFAULT_TIMEOUT_S = 300;
/** Labels under this prefix are ours (the template asked for), not the user's metadata. */
export const LABEL_PREFIX = 'aegis.e2b/';
export const TEMPLATE_LABEL = `${LABEL_PREFIX}template`;
/** Set when the sandbox was made with `network.allowPublicTraffic: false` (getHost then needs its traffic token). */
export const PRIVATE_TRAFFIC_LABEL = `${LABEL_PREFIX}private-traffic`;
/** E2B's default template: our base rootfs. */
export const BASE_TEMPLATE = 'base';

export interface Rest {
  status: number;
  body?: unknown;
  headers?: Record<string, string>;
}

type Json = Record<string, unknown>;

function obj(body: unknown): Json {
  if (body === undefined || body === null) return {};
  if (typeof body !== 'object' || Array.isArray(body)) throw new AegisError('INVALID_ARGUMENT', 'the body must be a JSON object');
  return body as Json;
}

function optInt(v: unknown, name: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0)
    throw new AegisError('INVALID_ARGUMENT', `${name} must be a whole number ≥ 0`);
  return v;
}

function stringMap(v: unknown, name: string): Record<string, string> | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) throw new AegisError('INVALID_ARGUMENT', `${name} must be an object of strings`);
  const out: Record<string, string> = {};
  for (const [k, val] of Object.entries(v)) {
    if (typeof val !== 'string') throw new AegisError('INVALID_ARGUMENT', `${name}.${k} must be a string`);
    out[k] = val;
  }
  return out;
}

/** E2B `network` / `allow_internet_access` onto our network mode and egress rules. */
export function networkOf(body: Json): Pick<CreateRequest, 'network' | 'egress'> {
  if (body['allow_internet_access'] === false) return { network: 'none' };
  const net = body['network'];
  if (net === undefined || net === null) return {};
  if (typeof net !== 'object') throw new AegisError('INVALID_ARGUMENT', 'network must be an object');
  const n = net as Json;
  const list = (k: string): string[] => {
    const v = n[k];
    if (v === undefined || v === null) return [];
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'string'))
      throw new AegisError('INVALID_ARGUMENT', `network.${k} must be a list of strings`);
    return v as string[];
  };
  const allowOut = list('allowOut');
  const denyOut = list('denyOut');
  // E2B: allowOut wins over denyOut, and "deny all" + allowOut is an allow-list. Ours: allow is
  // an allow-list, deny wins. So "deny all" + allowOut becomes our allow; other denials stay.
  const denyAll = denyOut.some((d) => d === '0.0.0.0/0' || d === '::/0');
  const deny = denyOut.filter((d) => d !== '0.0.0.0/0' && d !== '::/0');
  if (denyAll && allowOut.length === 0) return { network: 'none' };
  return { egress: { allow: denyAll ? allowOut : [], deny } };
}

function privateTraffic(body: Json): boolean {
  const net = body['network'];
  return typeof net === 'object' && net !== null && (net as Json)['allowPublicTraffic'] === false;
}

/**
 * E2B's create body onto our CreateInstanceRequest. `template` is `base` (our base rootfs), a
 * snapshot's name (`snapshots` says which exist) or an OCI image reference.
 */
export function createRequestOf(raw: unknown, snapshots: ReadonlySet<string>): CreateRequest {
  const body = obj(raw);
  const template = body['templateID'];
  if (typeof template !== 'string' || template === '') throw new AegisError('INVALID_ARGUMENT', 'templateID is required');
  if (body['autoPause'] === true) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      "lifecycle.onTimeout 'pause' is not served by aegisd: a sandbox ends at its timeout (pause it yourself with sandbox.pause())",
    );
  }
  if (Array.isArray(body['volumeMounts']) && body['volumeMounts'].length > 0) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      "E2B volumes are part of E2B's cloud; use aegis named volumes (aegis run -v NAME:/path) instead",
    );
  }
  const timeoutS = optInt(body['timeout'], 'timeout') ?? DEFAULT_TIMEOUT_S;
  const metadata = stringMap(body['metadata'], 'metadata') ?? {};
  for (const k of Object.keys(metadata)) {
    if (k.startsWith(LABEL_PREFIX)) throw new AegisError('INVALID_ARGUMENT', `metadata keys under ${LABEL_PREFIX} are reserved`);
  }
  const env = stringMap(body['envVars'], 'envVars');
  const source =
    template === BASE_TEMPLATE
      ? { command: ['sleep', 'infinity'] }
      : snapshots.has(template)
        ? { snapshot: template }
        : { image: template, command: ['sleep', 'infinity'] };
  const req: Json = {
    ...source,
    ...(env && !('snapshot' in source) ? { env } : {}),
    labels: { ...metadata, [TEMPLATE_LABEL]: template, ...(privateTraffic(body) ? { [PRIVATE_TRAFFIC_LABEL]: 'true' } : {}) },
    timeoutMs: timeoutS * 1000,
    // E2B's kill at timeout: a throwaway instance is deleted when it stops.
    autoRemove: true,
    ...('snapshot' in source ? {} : networkOf(body)),
  };
  return validateBody('CreateInstanceRequest', req);
}

/** E2B's state of an instance: running or paused; anything else is gone for E2B. */
export function e2bState(state: InstanceView['state']): 'running' | 'paused' | undefined {
  if (state === 'running' || state === 'starting') return 'running';
  if (state === 'paused' || state === 'hibernated') return 'paused';
  return undefined;
}

/** Paused or hibernated by someone's request (not for idleness, which any use wakes). */
export function pausedByRequest(v: InstanceView): boolean {
  if (v.state === 'paused') return v.idlePaused !== true;
  return v.state === 'hibernated' && (v.stateReason === undefined || v.stateReason === 'hibernated by request');
}

export function metadataOf(v: InstanceView): Record<string, string> {
  return Object.fromEntries(Object.entries(v.labels ?? {}).filter(([k]) => !k.startsWith(LABEL_PREFIX)));
}

export function templateOf(v: InstanceView): string {
  return v.labels?.[TEMPLATE_LABEL] ?? v.image ?? BASE_TEMPLATE;
}

const FAR_FUTURE = '2099-01-01T00:00:00.000Z';

/** ListedSandbox of E2B's API. */
export function listedOf(v: InstanceView, diskSizeMB: number): Json {
  return {
    templateID: templateOf(v),
    alias: templateOf(v),
    sandboxID: v.id,
    clientID: 'aegis',
    startedAt: v.startedAt ?? v.createdAt,
    endAt: v.deadline ?? FAR_FUTURE,
    cpuCount: v.vcpuCount,
    memoryMB: v.memoryMiB,
    diskSizeMB,
    metadata: metadataOf(v),
    state: e2bState(v.state) ?? 'paused',
    envdVersion: ENVD_VERSION,
    volumeMounts: [],
  };
}

/** E2B's Sandbox (create and connect answers). */
export function sandboxOf(v: InstanceView, token: string, domain: string, trafficToken?: string): Json {
  return {
    templateID: templateOf(v),
    alias: templateOf(v),
    sandboxID: v.id,
    clientID: 'aegis',
    envdVersion: ENVD_VERSION,
    envdAccessToken: token,
    trafficAccessToken: v.labels?.[PRIVATE_TRAFFIC_LABEL] !== undefined && trafficToken ? trafficToken : null,
    domain,
  };
}

/** `metadata=` of GET /v2/sandboxes: `k=v&k2=v2` with keys and values URI-encoded. */
export function parseMetadataQuery(q: string | null): Record<string, string> {
  if (!q) return {};
  const out: Record<string, string> = {};
  for (const [k, v] of new URLSearchParams(q)) {
    try {
      out[decodeURIComponent(k)] = decodeURIComponent(v);
    } catch {
      throw new AegisError('INVALID_ARGUMENT', 'metadata must be URI-encoded key=value pairs');
    }
  }
  return out;
}

/** One page of `items` (newest first) after `nextToken`; the token of the next page, if any. */
export function page<T extends { createdAt: string; id: string }>(
  items: T[],
  limit: number | undefined,
  nextToken: string | null,
): { items: T[]; next: string | undefined } {
  const sorted = [...items].sort((a, b) => (a.createdAt === b.createdAt ? a.id.localeCompare(b.id) : a.createdAt < b.createdAt ? 1 : -1));
  let start = 0;
  if (nextToken) {
    let after: { c: string; i: string };
    try {
      after = JSON.parse(Buffer.from(nextToken, 'base64url').toString('utf8')) as { c: string; i: string };
    } catch {
      throw new AegisError('INVALID_ARGUMENT', 'nextToken is not one this endpoint gave');
    }
    start = sorted.findIndex((x) => x.createdAt < after.c || (x.createdAt === after.c && x.id.localeCompare(after.i) > 0));
    if (start < 0) start = sorted.length;
  }
  const n = limit ?? 100;
  const slice = sorted.slice(start, start + n);
  const last = slice[slice.length - 1];
  const next =
    start + n < sorted.length && last ? Buffer.from(JSON.stringify({ c: last.createdAt, i: last.id })).toString('base64url') : undefined;
  return { items: slice, next };
}

/** Our code beside an E2B answer built here rather than thrown (see errors.ts). */
const PRECONDITION = { 'x-aegis-error-code': 'FAILED_PRECONDITION' };

function nextHeader(next: string | undefined): Record<string, string> {
  return next ? { 'x-next-token': next } : {};
}

function limitOf(q: URLSearchParams): number | undefined {
  const l = q.get('limit');
  if (l === null) return undefined;
  if (!/^\d{1,4}$/.test(l) || Number(l) < 1 || Number(l) > 1000) throw new AegisError('INVALID_ARGUMENT', 'limit must be 1–1000');
  return Number(l);
}

type Handler = (p: { params: string[]; query: URLSearchParams; body: unknown; signal: AbortSignal }) => Promise<Rest>;
export interface RestRoute {
  method: string;
  pattern: RegExp;
  handler: Handler;
}

const CLOUD_ONLY: Array<[RegExp, string]> = [
  [
    /^\/(v\d+\/)?templates(\/|$)/,
    'template builds happen in E2B\'s cloud; aegisd takes an OCI image reference (or "base", or a snapshot\'s name) as the template',
  ],
  [/^\/teams(\/|$)/, "teams are part of E2B's cloud; aegisd has one user"],
  [/^\/(api-keys|access-tokens)(\/|$)/, 'aegisd has one API key: `aegis e2b key --rotate` replaces it'],
  [/^\/(volumes|volumecontent)(\/|$)/, "E2B volumes are part of E2B's cloud; use aegis named volumes (aegis volume create)"],
  [/^\/secrets(\/|$)/, "E2B secrets are part of E2B's cloud; use aegis secrets (aegis secret set)"],
  [/^\/(billing|usage)(\/|$)/, 'there is no billing in a local aegisd'],
];

/** The answer for a path E2B's cloud serves and we do not: a clear 501, never a hang. */
export function cloudOnly(path: string): Rest | undefined {
  for (const [re, why] of CLOUD_ONLY) {
    if (re.test(path)) return { status: 501, body: { code: 501, message: `${path} is not served by aegisd's E2B endpoint: ${why}` } };
  }
  return undefined;
}

export function sandboxRoutes(d: DaemonContext, keys: E2bKeys, domain: string): RestRoute[] {
  const m = d.instances;
  const diskSizeMB = d.config.scratchDiskMiB;
  /** The instance of a sandbox E2B can see (running, paused or hibernated), or NOT_FOUND. */
  const find = (id: string): InstanceView => {
    const v = m.get(id);
    if (v.id !== id && v.handle !== id) throw new AegisError('NOT_FOUND', `sandbox ${id} not found`);
    if (!e2bState(v.state)) throw new AegisError('NOT_FOUND', `sandbox ${id} not found (its instance is ${v.state})`);
    return v;
  };
  const snapshotNames = async (): Promise<Set<string>> => new Set((await m.snapshots.list()).map((s) => s.meta.name));
  const id0 = (p: string[]): string => p[0] ?? '';

  const list: Handler = async ({ query }) => {
    const states = (query.get('state') ?? 'running,paused').split(',').filter(Boolean);
    const metadata = parseMetadataQuery(query.get('metadata'));
    const template = query.get('template');
    const all = m.list(false).filter((v) => {
      const s = e2bState(v.state);
      if (!s || !states.includes(s)) return false;
      if (template && templateOf(v) !== template) return false;
      const md = metadataOf(v);
      return Object.entries(metadata).every(([k, val]) => md[k] === val);
    });
    const { items, next } = page(all, limitOf(query), query.get('nextToken'));
    return { status: 200, body: items.map((v) => listedOf(v, diskSizeMB)), headers: nextHeader(next) };
  };

  const connect: Handler = async ({ params, body, signal }) => {
    const v = find(id0(params));
    const b = obj(body);
    const timeout = optInt(b['timeout'], 'timeout');
    const instance = m.instance(v.id);
    let status = 200;
    // E2B's pause is durable and connect resumes it: ours is hibernation (or a user's pause).
    if (v.state === 'hibernated' || v.state === 'paused') {
      await instance.resume();
      status = 201;
    }
    void signal;
    // E2B's connect lengthens a sandbox's life, never shortens it.
    const current = m.get(v.id).deadline;
    if (timeout !== undefined && (current === undefined || Date.parse(current) < Date.now() + timeout * 1000))
      instance.extend(timeout * 1000);
    return { status, body: sandboxOf(m.get(v.id), keys.accessToken(v.id), domain, keys.trafficToken(v.id)) };
  };

  return [
    {
      method: 'POST',
      pattern: /^\/(?:v2\/)?sandboxes$/,
      handler: async ({ body, signal }) => {
        const req = createRequestOf(body, await snapshotNames());
        const v = await m.create(req, signal);
        return { status: 201, body: sandboxOf(v, keys.accessToken(v.id), domain, keys.trafficToken(v.id)) };
      },
    },
    { method: 'GET', pattern: /^\/v2\/sandboxes$/, handler: list },
    {
      method: 'GET',
      pattern: /^\/sandboxes$/,
      handler: async (p) => {
        // v1: running ones, metadata filter; no pagination.
        const q = new URLSearchParams(p.query);
        q.set('state', 'running');
        q.set('limit', '1000');
        return list({ ...p, query: q });
      },
    },
    {
      method: 'GET',
      pattern: /^\/sandboxes\/([^/]+)$/,
      handler: async ({ params }) => {
        const v = find(id0(params));
        return {
          status: 200,
          body: { ...listedOf(v, diskSizeMB), envdAccessToken: keys.accessToken(v.id), domain },
        };
      },
    },
    {
      method: 'DELETE',
      pattern: /^\/sandboxes\/([^/]+)$/,
      handler: async ({ params }) => {
        const v = find(id0(params));
        await m.deleteInstance(v.id, true);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/timeout$/,
      handler: async ({ params, body }) => {
        const v = find(id0(params));
        const t = optInt(obj(body)['timeout'], 'timeout');
        if (t === undefined) throw new AegisError('INVALID_ARGUMENT', 'timeout (seconds) is required');
        m.instance(v.id).extend(Math.max(1, t) * 1000);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/refreshes$/,
      handler: async ({ params, body }) => {
        const v = find(id0(params));
        const t = optInt(obj(body)['duration'], 'duration') ?? DEFAULT_TIMEOUT_S;
        m.instance(v.id).extend(Math.max(1, t) * 1000);
        return { status: 204 };
      },
    },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/pause$/,
      handler: async ({ params, signal }) => {
        const v = find(id0(params));
        if (e2bState(v.state) === 'paused')
          return { status: 409, body: { code: 409, message: `sandbox ${v.id} is already paused` }, headers: PRECONDITION };
        // A request's hibernation (a custom reason would make it an idle one, skipped when in use).
        await m.instance(v.id).hibernate(signal);
        return { status: 204 };
      },
    },
    { method: 'POST', pattern: /^\/(?:v2\/)?sandboxes\/([^/]+)\/connect$/, handler: connect },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/resume$/,
      handler: async (p) => {
        const v = find(id0(p.params));
        if (e2bState(v.state) !== 'paused')
          return { status: 409, body: { code: 409, message: `sandbox ${v.id} is not paused` }, headers: PRECONDITION };
        const r = await connect(p);
        return { ...r, status: 201 };
      },
    },
    {
      method: 'GET',
      pattern: /^\/sandboxes\/([^/]+)\/metrics$/,
      handler: async ({ params, query }) => {
        const v = find(id0(params));
        // One sample, of now: none when the range asked for (unix seconds) leaves now out.
        const nowS = Date.now() / 1000;
        const start = Number(query.get('start') ?? -Infinity);
        const end = Number(query.get('end') ?? Infinity);
        if (v.state === 'hibernated' || nowS < start || nowS > end + 1) return { status: 200, body: [] };
        const s = await m.instance(v.id).stats();
        const now = new Date();
        return {
          status: 200,
          body: [
            {
              timestamp: now.toISOString(),
              timestampUnix: Math.floor(now.getTime() / 1000),
              cpuCount: v.vcpuCount,
              cpuUsedPct: s.cpuPercent === null ? 0 : Math.round((s.cpuPercent / v.vcpuCount) * 100) / 100,
              memUsed: s.guestMemoryUsedBytes ?? s.vmmMemoryBytes ?? 0,
              memTotal: s.guestMemoryTotalBytes ?? s.memoryLimitBytes,
              memCache: 0,
              diskUsed: s.diskUsedBytes ?? 0,
              diskTotal: diskSizeMB * 1024 * 1024,
            },
          ],
        };
      },
    },
    {
      method: 'GET',
      pattern: /^\/sandboxes\/([^/]+)\/logs$/,
      handler: async ({ params }) => {
        find(id0(params));
        return { status: 200, body: { logs: [], logEntries: [] } };
      },
    },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/fork$/,
      handler: async ({ params, body, signal }) => {
        const v = find(id0(params));
        const b = obj(body);
        const count = optInt(b['count'], 'count') ?? 1;
        const timeout = optInt(b['timeout'], 'timeout') ?? DEFAULT_TIMEOUT_S;
        const forked = await m.fork(v.id, count, { timeoutMs: timeout * 1000, autoRemove: true }, signal);
        return {
          status: 201,
          body: forked.instances.map((f) => ({ sandbox: sandboxOf(f, keys.accessToken(f.id), domain, keys.trafficToken(f.id)) })),
        };
      },
    },
    {
      method: 'POST',
      pattern: /^\/sandboxes\/([^/]+)\/snapshots$/,
      handler: async ({ params, body, signal }) => {
        const v = find(id0(params));
        const b = obj(body);
        const given = b['name'];
        if (given !== undefined && typeof given !== 'string') throw new AegisError('INVALID_ARGUMENT', 'name must be a string');
        const name = given ?? `${v.handle.slice(0, 80)}-snap-${Date.now().toString(36)}`;
        const snap = await m.instance(v.id).checkpoint(name, false, signal);
        return { status: 201, body: { snapshotID: snap.meta.name, names: [snap.meta.name] } };
      },
    },
    {
      method: 'GET',
      pattern: /^\/snapshots$/,
      handler: async ({ query }) => {
        const sandbox = query.get('sandboxID');
        const name = query.get('name');
        const all = (await m.snapshots.list())
          .filter((s) => !s.meta.auto)
          .filter((s) => (sandbox ? s.meta.instance.id === sandbox : true) && (name ? s.meta.name === name : true))
          .map((s) => ({ createdAt: new Date(s.meta.createdAt).toISOString(), id: s.meta.name }));
        const { items, next } = page(all, limitOf(query), query.get('nextToken'));
        return { status: 200, body: items.map((s) => ({ snapshotID: s.id, names: [s.id] })), headers: nextHeader(next) };
      },
    },
    {
      method: 'DELETE',
      pattern: /^\/templates\/([^/]+)$/,
      handler: async ({ params }) => {
        const name = id0(params);
        if (!(await snapshotNames()).has(name)) throw new AegisError('NOT_FOUND', `snapshot ${name} not found`);
        await m.deleteSnapshot(name);
        return { status: 204 };
      },
    },
  ];
}
