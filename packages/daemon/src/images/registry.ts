import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { AegisError } from '@aegis/protocol';
import { sha256Digest, type BlobStore } from './blobs.js';
import { DEFAULT_REGISTRY, formatReference, registryHost, validateDigest, type ImageReference } from './reference.js';

export const MEDIA_TYPES = {
  ociIndex: 'application/vnd.oci.image.index.v1+json',
  ociManifest: 'application/vnd.oci.image.manifest.v1+json',
  dockerManifestList: 'application/vnd.docker.distribution.manifest.list.v2+json',
  dockerManifest: 'application/vnd.docker.distribution.manifest.v2+json',
  ociConfig: 'application/vnd.oci.image.config.v1+json',
  dockerConfig: 'application/vnd.docker.container.image.v1+json',
  ociLayer: 'application/vnd.oci.image.layer.v1.tar',
  ociLayerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
  dockerLayer: 'application/vnd.docker.image.rootfs.diff.tar',
  dockerLayerGzip: 'application/vnd.docker.image.rootfs.diff.tar.gzip',
} as const;

const SUPPORTED_LAYERS: ReadonlySet<string> = new Set([
  MEDIA_TYPES.ociLayer,
  MEDIA_TYPES.ociLayerGzip,
  MEDIA_TYPES.dockerLayer,
  MEDIA_TYPES.dockerLayerGzip,
]);

/** Manifests and configs are small; anything bigger is hostile or broken, and is never buffered. */
export const MAX_DOCUMENT_BYTES = 4 * 1024 * 1024;
const MAX_LAYERS = 1000;
const LAYER_CONCURRENCY = 3;

/** The parts of an image config that change how we run it. */
export interface ImageConfig {
  env: string[];
  workingDir?: string;
  entrypoint?: string[];
  cmd?: string[];
  user?: string;
  architecture: string;
  os: string;
  variant?: string;
  created?: string;
  /** sha256 of each layer uncompressed, in order: what an unpacker verifies the extracted tar against. */
  diffIds: string[];
}

export interface LayerDescriptor {
  digest: string;
  mediaType: string;
  size: number;
}

export interface PulledImage {
  /** Canonical reference (see formatReference); absent for an imported image that had no name. */
  reference?: string;
  /** Digest of the platform-specific manifest, which is stored in the BlobStore too. */
  digest: string;
  config: ImageConfig;
  configDigest: string;
  layers: LayerDescriptor[];
  /** Bytes stored for this image: config plus layers as distributed (compressed where they were). */
  sizeBytes: number;
}

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
}

export interface PullProgress {
  digest: string;
  doneBytes: number;
  totalBytes: number;
  phase: 'layer' | 'config' | 'manifest';
}

export interface Credentials {
  username: string;
  password: string;
}

export interface PullOptions {
  /** Hosts (`host` or `host:port`) reached over plain http. Loopback registries always are. */
  insecureRegistries?: string[];
  /** A Docker `config.json`; defaults to `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`. */
  dockerConfigPath?: string;
  /** Takes precedence over the Docker config. */
  credentials?: Credentials;
  /** Defaults to the host's: linux and the CPU Node runs on. */
  platform?: Platform;
  onProgress?: (p: PullProgress) => void;
  signal?: AbortSignal;
  /** Replaces the global fetch; tests use it to watch the wire. */
  fetch?: typeof fetch;
}

export interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  platform?: Platform;
  annotations?: Record<string, string>;
  urls?: string[];
}

export interface ParsedManifest {
  kind: 'manifest';
  mediaType: string;
  config: Descriptor;
  layers: Descriptor[];
}

export interface ParsedIndex {
  kind: 'index';
  mediaType: string;
  manifests: Descriptor[];
}

/**
 * Fetches an image's manifest, config and layers into `store`, verifying every byte against its
 * digest. Blobs already stored are not fetched again; a layer whose download was interrupted
 * resumes where it stopped.
 */
export async function pullImage(ref: ImageReference, store: BlobStore, options: PullOptions = {}): Promise<PulledImage> {
  const signal = options.signal;
  signal?.throwIfAborted();
  const host = registryHost(ref);
  const insecure = options.insecureRegistries ?? [];
  const credentials = options.credentials ?? (await loadDockerCredentials(ref.registry, options.dockerConfigPath));
  const client = new RegistryClient(host, ref.repository, insecure, credentials, options.fetch ?? fetch, signal);
  const platform = options.platform ?? hostPlatform();
  const progress = options.onProgress;

  let target = ref.digest ?? ref.tag ?? 'latest';
  let expected = ref.digest;
  let expectedSize: number | undefined;
  let manifest: ParsedManifest | undefined;
  let manifestDigest = '';
  for (let depth = 0; manifest === undefined; depth++) {
    const { bytes, digest, contentType } = await fetchManifest(client, store, target, expected);
    if (expectedSize !== undefined && bytes.length !== expectedSize) {
      throw new AegisError('INVALID_ARGUMENT', `manifest ${digest} is ${bytes.length} bytes but its index says ${expectedSize}`);
    }
    progress?.({ digest, doneBytes: bytes.length, totalBytes: bytes.length, phase: 'manifest' });
    const doc = parseManifestDocument(bytes, contentType);
    await store.put(digest, bytes);
    if (doc.kind === 'manifest') {
      manifest = doc;
      manifestDigest = digest;
      break;
    }
    if (depth > 0)
      throw new AegisError('UNSUPPORTED', `image ${formatReference(ref)} nests one index inside another, which is not supported`);
    const chosen = selectManifest(doc, platform, formatReference(ref));
    target = chosen.digest;
    expected = chosen.digest;
    expectedSize = chosen.size;
  }

  for (const layer of manifest.layers) checkLayerMediaType(layer);
  const configDesc = manifest.config;
  if (configDesc.size > MAX_DOCUMENT_BYTES) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `image config ${configDesc.digest} is ${configDesc.size} bytes; at most ${MAX_DOCUMENT_BYTES} are allowed`,
    );
  }

  await store.ingest(
    configDesc.digest,
    configDesc.size,
    (offset) => client.openBlob(configDesc.digest, offset),
    (done, total) => progress?.({ digest: configDesc.digest, doneBytes: done, totalBytes: total ?? configDesc.size, phase: 'config' }),
    signal,
  );
  const configBytes = await store.read(configDesc.digest, MAX_DOCUMENT_BYTES);

  // The first failure stops the other downloads; what they fetched stays in partial/ for a retry.
  const stop = new AbortController();
  const layerSignal = signal ? AbortSignal.any([signal, stop.signal]) : stop.signal;
  const layerClient = client.withSignal(layerSignal);
  try {
    await forEachLimited(manifest.layers, LAYER_CONCURRENCY, async (layer) => {
      await store.ingest(
        layer.digest,
        layer.size,
        (offset) => layerClient.openBlob(layer.digest, offset),
        (done, total) => progress?.({ digest: layer.digest, doneBytes: done, totalBytes: total ?? layer.size, phase: 'layer' }),
        layerSignal,
      );
    });
  } catch (err) {
    stop.abort();
    throw err;
  }

  return imageFromManifest(manifest, manifestDigest, configBytes, formatReference(ref));
}

/** Builds the pulled-image record once every blob of `manifest` is stored. */
export function imageFromManifest(manifest: ParsedManifest, manifestDigest: string, configBytes: Buffer, reference?: string): PulledImage {
  const config = parseImageConfig(configBytes);
  if (config.diffIds.length !== manifest.layers.length) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `image ${manifestDigest} has ${manifest.layers.length} layers but its config lists ${config.diffIds.length} diff_ids`,
    );
  }
  const layers = manifest.layers.map((l) => ({ digest: l.digest, mediaType: l.mediaType, size: l.size }));
  const image: PulledImage = {
    digest: manifestDigest,
    config,
    configDigest: manifest.config.digest,
    layers,
    sizeBytes: manifest.config.size + layers.reduce((sum, l) => sum + l.size, 0),
  };
  if (reference !== undefined) image.reference = reference;
  return image;
}

export function hostPlatform(): Platform {
  const arch: Record<string, string> = {
    x64: 'amd64',
    arm64: 'arm64',
    ia32: '386',
    arm: 'arm',
    ppc64: 'ppc64le',
    s390x: 's390x',
    riscv64: 'riscv64',
  };
  return { os: 'linux', architecture: arch[process.arch] ?? process.arch };
}

/** Picks the entry of an index for `platform`, preferring an exact variant and then none at all. */
export function selectManifest(index: ParsedIndex, platform: Platform, name: string): Descriptor {
  const candidates = index.manifests.filter((m) => m.platform?.os === platform.os && m.platform.architecture === platform.architecture);
  // arm64 images are v8 whether or not they say so; amd64 variants (v2, v3…) need CPUs we cannot promise.
  const implied = platform.variant ?? (platform.architecture === 'arm64' ? 'v8' : undefined);
  const variantOf = (m: Descriptor): string | undefined => m.platform?.variant ?? (m.platform?.architecture === 'arm64' ? 'v8' : undefined);
  const exact = candidates.find((m) => variantOf(m) === implied);
  const chosen = exact ?? candidates.find((m) => variantOf(m) === undefined);
  if (chosen) return chosen;
  const available = index.manifests
    .filter((m) => m.platform && m.platform.os !== 'unknown')
    .map((m) => [m.platform?.os, m.platform?.architecture, m.platform?.variant].filter(Boolean).join('/'));
  const wanted = [platform.os, platform.architecture, platform.variant].filter(Boolean).join('/');
  throw new AegisError(
    'UNSUPPORTED',
    `image ${name} has no ${wanted} variant` + (available.length > 0 ? ` (it has ${available.join(', ')})` : ''),
  );
}

/** Rejects layer formats we cannot unpack before any of them is downloaded. */
export function checkLayerMediaType(layer: Descriptor): void {
  if (SUPPORTED_LAYERS.has(layer.mediaType)) return;
  if (layer.mediaType.endsWith('+zstd') || layer.mediaType.endsWith('.zstd')) {
    throw new AegisError(
      'UNSUPPORTED',
      `layer ${layer.digest} is zstd-compressed, which is not supported yet; rebuild the image with gzip layers`,
    );
  }
  if (layer.mediaType.includes('nondistributable') || layer.mediaType.includes('foreign')) {
    throw new AegisError(
      'UNSUPPORTED',
      `layer ${layer.digest} is a foreign (non-distributable) layer, which is not supported (it is a Windows base layer?)`,
    );
  }
  throw new AegisError(
    'UNSUPPORTED',
    `layer ${layer.digest} has media type ${JSON.stringify(layer.mediaType)}, which is not a container filesystem layer`,
  );
}

// ---- documents ---------------------------------------------------------------------------------

type Json = Record<string, unknown>;

function invalid(message: string): AegisError {
  return new AegisError('INVALID_ARGUMENT', message);
}

export function parseJsonDocument(bytes: Buffer, what: string): Json {
  if (bytes.length > MAX_DOCUMENT_BYTES) throw invalid(`${what} is ${bytes.length} bytes; at most ${MAX_DOCUMENT_BYTES} are allowed`);
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw invalid(`${what} is not valid JSON`);
  }
  if (!isObject(doc)) throw invalid(`${what} is not a JSON object`);
  return doc;
}

function isObject(v: unknown): v is Json {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function optString(doc: Json, key: string, what: string): string | undefined {
  const v = doc[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string') throw invalid(`${what}: ${key} must be a string`);
  if (v.includes('\0')) throw invalid(`${what}: ${key} contains a NUL character`);
  return v;
}

function reqString(doc: Json, key: string, what: string): string {
  const v = optString(doc, key, what);
  if (v === undefined) throw invalid(`${what}: ${key} is missing`);
  return v;
}

function optStringArray(doc: Json, key: string, what: string): string[] | undefined {
  const v = doc[key];
  if (v === undefined || v === null) return undefined;
  if (!Array.isArray(v) || !v.every((s): s is string => typeof s === 'string' && !s.includes('\0'))) {
    throw invalid(`${what}: ${key} must be an array of strings`);
  }
  return v;
}

function parseDescriptor(v: unknown, what: string): Descriptor {
  if (!isObject(v)) throw invalid(`${what} is not an object`);
  const mediaType = reqString(v, 'mediaType', what);
  const digest = validateDigest(reqString(v, 'digest', what), `${what} digest`);
  const size = v['size'];
  if (typeof size !== 'number' || !Number.isSafeInteger(size) || size < 0) throw invalid(`${what}: size must be a non-negative integer`);
  const d: Descriptor = { mediaType, digest, size };
  const platform = v['platform'];
  if (platform !== undefined) {
    if (!isObject(platform)) throw invalid(`${what}: platform is not an object`);
    d.platform = {
      os: reqString(platform, 'os', `${what} platform`),
      architecture: reqString(platform, 'architecture', `${what} platform`),
    };
    const variant = optString(platform, 'variant', `${what} platform`);
    if (variant !== undefined && variant !== '') d.platform.variant = variant;
  }
  const annotations = v['annotations'];
  if (isObject(annotations)) {
    d.annotations = {};
    for (const [k, a] of Object.entries(annotations)) if (typeof a === 'string') d.annotations[k] = a;
  }
  const urls = optStringArray(v, 'urls', what);
  if (urls !== undefined) d.urls = urls;
  return d;
}

/** Parses a manifest or an index; `contentType` is the fallback when the document does not say. */
export function parseManifestDocument(bytes: Buffer, contentType?: string): ParsedManifest | ParsedIndex {
  const doc = parseJsonDocument(bytes, 'manifest');
  const header = contentType?.split(';')[0]?.trim();
  const mediaType = optString(doc, 'mediaType', 'manifest') ?? header ?? '';
  if (doc['schemaVersion'] === 1 || mediaType.startsWith('application/vnd.docker.distribution.manifest.v1')) {
    throw new AegisError('UNSUPPORTED', 'the image uses the deprecated Docker schema 1 manifest format; push it again with a current tool');
  }
  if (doc['schemaVersion'] !== 2) throw invalid('manifest: schemaVersion must be 2');

  const isIndex = mediaType === MEDIA_TYPES.ociIndex || mediaType === MEDIA_TYPES.dockerManifestList;
  const isManifest = mediaType === MEDIA_TYPES.ociManifest || mediaType === MEDIA_TYPES.dockerManifest;
  if (isIndex || (!isManifest && Array.isArray(doc['manifests']))) {
    const list = doc['manifests'];
    if (!Array.isArray(list)) throw invalid('index: manifests must be an array');
    if (list.length > MAX_LAYERS) throw invalid(`index lists ${list.length} manifests; at most ${MAX_LAYERS} are allowed`);
    return {
      kind: 'index',
      mediaType: mediaType || MEDIA_TYPES.ociIndex,
      manifests: list.map((m, i) => parseDescriptor(m, `index entry ${i}`)),
    };
  }
  if (!isManifest && !(mediaType === '' && isObject(doc['config']))) {
    throw new AegisError('UNSUPPORTED', `manifest media type ${JSON.stringify(mediaType)} is not an image manifest`);
  }
  const config = parseDescriptor(doc['config'], 'manifest config');
  if (config.mediaType !== MEDIA_TYPES.ociConfig && config.mediaType !== MEDIA_TYPES.dockerConfig) {
    throw new AegisError(
      'UNSUPPORTED',
      `the artifact's config has media type ${JSON.stringify(config.mediaType)}; it is not a container image`,
    );
  }
  const layers = doc['layers'];
  if (!Array.isArray(layers)) throw invalid('manifest: layers must be an array');
  if (layers.length > MAX_LAYERS) throw invalid(`manifest lists ${layers.length} layers; at most ${MAX_LAYERS} are allowed`);
  return {
    kind: 'manifest',
    mediaType: mediaType || MEDIA_TYPES.ociManifest,
    config,
    layers: layers.map((l, i) => parseDescriptor(l, `layer ${i}`)),
  };
}

export function parseImageConfig(bytes: Buffer): ImageConfig {
  const what = 'image config';
  const doc = parseJsonDocument(bytes, what);
  const config: ImageConfig = {
    env: [],
    architecture: reqString(doc, 'architecture', what),
    os: reqString(doc, 'os', what),
    diffIds: [],
  };
  const variant = optString(doc, 'variant', what);
  if (variant) config.variant = variant;
  const created = optString(doc, 'created', what);
  if (created) config.created = created;

  const run = doc['config'];
  if (run !== undefined && run !== null) {
    if (!isObject(run)) throw invalid(`${what}: config must be an object`);
    const w = `${what} config`;
    config.env = optStringArray(run, 'Env', w) ?? [];
    const entrypoint = optStringArray(run, 'Entrypoint', w);
    if (entrypoint !== undefined) config.entrypoint = entrypoint;
    const cmd = optStringArray(run, 'Cmd', w);
    if (cmd !== undefined) config.cmd = cmd;
    const workingDir = optString(run, 'WorkingDir', w);
    if (workingDir) config.workingDir = workingDir;
    const user = optString(run, 'User', w);
    if (user) config.user = user;
  }

  const rootfs = doc['rootfs'];
  if (!isObject(rootfs)) throw invalid(`${what}: rootfs is missing`);
  if (rootfs['type'] !== 'layers') throw invalid(`${what}: rootfs.type must be "layers"`);
  const diffIds = optStringArray(rootfs, 'diff_ids', `${what} rootfs`) ?? [];
  config.diffIds = diffIds.map((d, i) => validateDigest(d, `${what} diff_ids[${i}]`));
  return config;
}

// ---- credentials -------------------------------------------------------------------------------

const DOCKER_HUB_ALIASES = new Set([DEFAULT_REGISTRY, 'index.docker.io', 'registry-1.docker.io']);

/** Looks up `auths[registry].auth` in a Docker config. Credential helpers are not consulted. */
export async function loadDockerCredentials(registry: string, configPath?: string): Promise<Credentials | undefined> {
  const file = configPath ?? path.join(process.env['DOCKER_CONFIG'] ?? path.join(os.homedir(), '.docker'), 'config.json');
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch {
    return undefined;
  }
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw new AegisError('FAILED_PRECONDITION', `the Docker config ${file} is not valid JSON; fix or remove it`);
  }
  const auths = isObject(doc) ? doc['auths'] : undefined;
  if (!isObject(auths)) return undefined;
  const hub = DOCKER_HUB_ALIASES.has(registry);
  for (const [key, entry] of Object.entries(auths)) {
    const name = key.replace(/^[a-z]+:\/\//, '').replace(/\/.*$/, '');
    if (!(name === registry || (hub && DOCKER_HUB_ALIASES.has(name)))) continue;
    if (!isObject(entry)) continue;
    const auth = entry['auth'];
    if (typeof auth === 'string' && auth !== '') {
      const decoded = Buffer.from(auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    }
    const username = entry['username'];
    const password = entry['password'];
    if (typeof username === 'string' && typeof password === 'string' && username !== '') return { username, password };
  }
  return undefined;
}

// ---- wire --------------------------------------------------------------------------------------

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
    throw invalid(`${what} is ${declared} bytes; at most ${max} are allowed`);
  }
  if (!res.body) return Buffer.alloc(0);
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    total += chunk.length;
    if (total > max) throw invalid(`${what} exceeds ${max} bytes`);
    chunks.push(Buffer.from(chunk));
  }
  return Buffer.concat(chunks);
}

class RegistryClient {
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

/**
 * Gets a manifest and proves it is the one asked for. By digest, a stored copy is already proven
 * and saves a round trip; by tag, the registry's Docker-Content-Digest is checked when it sends one.
 */
async function fetchManifest(
  client: RegistryClient,
  store: BlobStore,
  reference: string,
  expected: string | undefined,
): Promise<{ bytes: Buffer; digest: string; contentType: string | undefined }> {
  if (expected !== undefined && (await store.has(expected))) {
    return { bytes: await store.read(expected, MAX_DOCUMENT_BYTES), digest: expected, contentType: undefined };
  }
  const { bytes, contentType, headerDigest } = await client.getManifest(reference);
  const actual = sha256Digest(bytes);
  const claimed = expected ?? (headerDigest?.startsWith('sha256:') ? headerDigest : undefined);
  if (claimed !== undefined && claimed !== actual) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `manifest ${reference} does not match digest ${claimed} (got ${actual}); the registry sent corrupt data`,
    );
  }
  return { bytes, digest: actual, contentType };
}

/** Runs `fn` over `items`, at most `limit` at a time; stops starting new ones after a failure. */
async function forEachLimited<T>(items: readonly T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failed = false;
  const worker = async (): Promise<void> => {
    while (!failed && next < items.length) {
      const item = items[next++] as T;
      try {
        await fn(item);
      } catch (err) {
        failed = true;
        throw err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
