/**
 * A client of the OCI distribution API for one repository: the token dance a registry asks for
 * with its `WWW-Authenticate` challenge, capped reads, resumable blob reads, and registry errors
 * turned into codes and messages that say what to do next.
 */
import { Readable } from 'node:stream';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { AegisError } from '@aegis/protocol';
import type { Credentials } from './credentials.js';
import { MAX_DOCUMENT_BYTES, asBytes, exhausted } from './limits.js';
import { MEDIA_TYPES, isObject, parseJsonDocument } from './manifest.js';

const MANIFEST_ACCEPT = [MEDIA_TYPES.ociIndex, MEDIA_TYPES.ociManifest, MEDIA_TYPES.dockerManifestList, MEDIA_TYPES.dockerManifest].join(
  ', ',
);

function isLoopback(hostname: string): boolean {
  return hostname === 'localhost' || hostname === '[::1]' || hostname === '::1' || /^127\.\d+\.\d+\.\d+$/.test(hostname);
}

function hostnameOf(host: string): string {
  if (host.startsWith('[')) return host.slice(0, host.indexOf(']') + 1);
  const colon = host.lastIndexOf(':');
  return colon === -1 ? host : host.slice(0, colon);
}

/** Plain http is allowed only where nobody else can be on the path, or where the user said so. */
function allowsHttp(host: string, insecure: string[]): boolean {
  const hostname = hostnameOf(host);
  return isLoopback(hostname) || insecure.includes(host) || insecure.includes(hostname);
}

interface Challenge {
  scheme: string;
  params: Record<string, string>;
}

export function parseChallenge(header: string): Challenge | undefined {
  const m = /^\s*([A-Za-z]+)\s*(.*)$/.exec(header);
  if (!m) return undefined;
  const params: Record<string, string> = {};
  for (const p of (m[2] ?? '').matchAll(/([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))/g)) {
    params[(p[1] ?? '').toLowerCase()] = p[2] !== undefined ? p[2].replace(/\\(.)/g, '$1') : (p[3] ?? '');
  }
  return { scheme: (m[1] ?? '').toLowerCase(), params };
}

/** The registry's own explanation, if it sent one, made safe to put in a message. */
async function errorDetail(res: Response): Promise<string> {
  try {
    const text = (await readCapped(res, 64 * 1024, 'error body')).toString('utf8');
    const doc: unknown = JSON.parse(text);
    const first: unknown = isObject(doc) && Array.isArray(doc['errors']) ? doc['errors'][0] : undefined;
    if (isObject(first)) {
      const code = typeof first['code'] === 'string' ? first['code'] : '';
      const message = typeof first['message'] === 'string' ? first['message'] : '';
      return `${code}${code && message ? ': ' : ''}${message}`.replace(/[^\x20-\x7e]/g, '?').slice(0, 200);
    }
  } catch {
    // No usable body; the status says enough.
  }
  return `HTTP ${res.status}`;
}

async function readCapped(res: Response, max: number, what: string): Promise<Buffer> {
  const declared = Number(res.headers.get('content-length') ?? NaN);
  if (declared > max) {
    await res.body?.cancel().catch(() => undefined);
    throw exhausted(`${what} (${declared} bytes)`, asBytes(max), 'per document');
  }
  if (!res.body) return Buffer.alloc(0);
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    total += chunk.length;
    if (total > max) throw exhausted(what, asBytes(max), 'per document');
    chunks.push(Buffer.from(chunk));
  }
  return Buffer.concat(chunks);
}

export class RegistryClient {
  private authorization: string | undefined;

  constructor(
    private readonly host: string,
    private readonly repository: string,
    private readonly insecure: string[],
    private readonly credentials: Credentials | undefined,
    private readonly fetchFn: typeof fetch,
    private readonly signal: AbortSignal | undefined,
  ) {}

  private get base(): string {
    return `${allowsHttp(this.host, this.insecure) ? 'http' : 'https'}://${this.host}`;
  }

  /** The same session (and token) with another cancellation signal. */
  withSignal(signal: AbortSignal): RegistryClient {
    const c = new RegistryClient(this.host, this.repository, this.insecure, this.credentials, this.fetchFn, signal);
    c.authorization = this.authorization;
    return c;
  }

  async getManifest(reference: string): Promise<{ bytes: Buffer; contentType: string | undefined; headerDigest: string | undefined }> {
    const res = await this.request(`/v2/${this.repository}/manifests/${reference}`, { Accept: MANIFEST_ACCEPT }, `manifest ${reference}`);
    const bytes = await readCapped(res, MAX_DOCUMENT_BYTES, 'manifest');
    return {
      bytes,
      contentType: res.headers.get('content-type') ?? undefined,
      headerDigest: res.headers.get('docker-content-digest') ?? undefined,
    };
  }

  async openBlob(digest: string, offset: number): Promise<Readable> {
    const headers: Record<string, string> = {};
    if (offset > 0) headers['Range'] = `bytes=${offset}-`;
    const res = await this.request(`/v2/${this.repository}/blobs/${digest}`, headers, `blob ${digest}`);
    const body = res.body ? Readable.fromWeb(res.body as unknown as WebReadableStream<Uint8Array>) : Readable.from([]);
    if (offset === 0) return body;
    const start = /^bytes (\d+)-/.exec(res.headers.get('content-range') ?? '')?.[1];
    if (res.status === 206 && start !== undefined && Number(start) === offset) return body;
    // The server ignored the range: drop what we already have rather than start over on disk.
    return Readable.from(skip(body, res.status === 206 && start !== undefined ? offset - Number(start) : offset));
  }

  private async request(pathname: string, headers: Record<string, string>, what: string): Promise<Response> {
    const url = `${this.base}${pathname}`;
    let res = await this.send(url, headers);
    if (res.status === 401) {
      const challenge = parseChallenge(res.headers.get('www-authenticate') ?? '');
      await res.body?.cancel().catch(() => undefined);
      await this.authenticate(challenge);
      res = await this.send(url, headers);
    }
    if (res.ok) return res;
    const detail = await errorDetail(res);
    const name = `${this.host}/${this.repository}`;
    switch (res.status) {
      case 401:
      case 403:
        throw new AegisError(
          'FAILED_PRECONDITION',
          this.credentials
            ? `registry ${this.host} denied access to ${name} with the configured credentials (${detail}); check them, or log in again`
            : `pull access denied for ${name}: the repository does not exist or needs credentials; log in (docker login ${this.host}) and retry (${detail})`,
        );
      case 404:
        throw new AegisError('NOT_FOUND', `${what} of ${name} not found (${detail})`);
      case 429:
        throw new AegisError(
          'RESOURCE_EXHAUSTED',
          `registry ${this.host} is rate-limiting requests (${detail}); wait, or log in for a higher limit`,
        );
      default:
        throw new AegisError(
          res.status >= 500 ? 'UNAVAILABLE' : 'INVALID_ARGUMENT',
          `registry ${this.host} answered HTTP ${res.status} for ${what} of ${name} (${detail})`,
        );
    }
  }

  private async send(url: string, headers: Record<string, string>): Promise<Response> {
    const h: Record<string, string> = { ...headers, 'User-Agent': 'aegis' };
    if (this.authorization) h['Authorization'] = this.authorization;
    return this.fetchOrThrow(url, h, `registry ${this.host}`);
  }

  private async fetchOrThrow(url: string, headers: Record<string, string>, who: string): Promise<Response> {
    try {
      return await this.fetchFn(url, { headers, redirect: 'follow', signal: this.signal ?? null });
    } catch (err) {
      if (this.signal?.aborted || (err as Error).name === 'AbortError')
        throw new AegisError('CANCELLED', 'the pull was cancelled', { cause: err });
      const cause = (err as { cause?: { code?: string; message?: string } }).cause;
      const why = cause?.code ?? cause?.message ?? (err as Error).message;
      throw new AegisError('UNAVAILABLE', `cannot reach ${who} (${why}); check the network and the registry address`, { cause: err });
    }
  }

  private async authenticate(challenge: Challenge | undefined): Promise<void> {
    const loginHint = `log in with docker login ${this.host}, or pass credentials`;
    if (challenge?.scheme === 'basic') {
      if (!this.credentials) throw new AegisError('FAILED_PRECONDITION', `registry ${this.host} requires authentication; ${loginHint}`);
      this.authorization = basicAuth(this.credentials);
      return;
    }
    if (challenge?.scheme !== 'bearer' || !challenge.params['realm']) {
      throw new AegisError('UNSUPPORTED', `registry ${this.host} asked for an authentication scheme we do not support`);
    }
    let realm: URL;
    try {
      realm = new URL(challenge.params['realm']);
    } catch {
      throw new AegisError('INVALID_ARGUMENT', `registry ${this.host} sent a malformed token realm`);
    }
    if (realm.protocol !== 'https:' && !(realm.protocol === 'http:' && allowsHttp(realm.host, this.insecure))) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `registry ${this.host} wants tokens from ${realm.origin}, which is not https; add ${realm.host} to insecureRegistries if that is intended`,
      );
    }
    if (challenge.params['service']) realm.searchParams.set('service', challenge.params['service']);
    realm.searchParams.set('scope', challenge.params['scope'] || `repository:${this.repository}:pull`);
    const headers: Record<string, string> = { 'User-Agent': 'aegis' };
    if (this.credentials) headers['Authorization'] = basicAuth(this.credentials);
    const res = await this.fetchOrThrow(realm.toString(), headers, `the token service of ${this.host}`);
    if (res.status === 401 || res.status === 403) {
      await res.body?.cancel().catch(() => undefined);
      throw new AegisError(
        'FAILED_PRECONDITION',
        this.credentials
          ? `registry ${this.host} rejected the configured credentials; log in again (docker login ${this.host})`
          : `registry ${this.host} requires authentication; ${loginHint}`,
      );
    }
    if (!res.ok) {
      const code = res.status >= 500 ? 'UNAVAILABLE' : 'FAILED_PRECONDITION';
      throw new AegisError(code, `the token service of ${this.host} answered HTTP ${res.status} (${await errorDetail(res)})`);
    }
    const doc = parseJsonDocument(await readCapped(res, 1024 * 1024, 'token response'), 'token response');
    const token = typeof doc['token'] === 'string' && doc['token'] ? doc['token'] : doc['access_token'];
    if (typeof token !== 'string' || token === '')
      throw new AegisError('UNAVAILABLE', `the token service of ${this.host} returned no token`);
    this.authorization = `Bearer ${token}`;
  }
}

function basicAuth(c: Credentials): string {
  return `Basic ${Buffer.from(`${c.username}:${c.password}`).toString('base64')}`;
}

async function* skip(source: AsyncIterable<Buffer>, bytes: number): AsyncGenerator<Buffer> {
  let left = bytes;
  for await (const chunk of source) {
    if (left >= chunk.length) {
      left -= chunk.length;
      continue;
    }
    yield left > 0 ? chunk.subarray(left) : chunk;
    left = 0;
  }
}
