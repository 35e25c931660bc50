/**
 * The documents of an image as a registry or an archive holds them (index, manifest, config),
 * parsed strictly: they are untrusted, so each is size-capped, every field is checked and a format
 * we cannot unpack is refused before any layer is fetched.
 */
import { AegisError } from '@aegis/protocol';
import { MAX_DOCUMENT_BYTES, MAX_LAYERS, asBytes, asCount, exhausted } from './limits.js';
import { validateDigest } from './reference.js';

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

export interface Platform {
  os: string;
  architecture: string;
  variant?: string;
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

export type Json = Record<string, unknown>;

export function invalid(message: string): AegisError {
  return new AegisError('INVALID_ARGUMENT', message);
}

export function parseJsonDocument(bytes: Buffer, what: string): Json {
  if (bytes.length > MAX_DOCUMENT_BYTES) throw exhausted(`${what} (${bytes.length} bytes)`, asBytes(MAX_DOCUMENT_BYTES), 'per document');
  let doc: unknown;
  try {
    doc = JSON.parse(bytes.toString('utf8'));
  } catch {
    throw invalid(`${what} is not valid JSON`);
  }
  if (!isObject(doc)) throw invalid(`${what} is not a JSON object`);
  return doc;
}

export function isObject(v: unknown): v is Json {
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
    if (list.length > MAX_LAYERS) throw exhausted(`the index's ${list.length} manifests`, asCount(MAX_LAYERS, 'manifests'), 'per index');
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
  if (layers.length > MAX_LAYERS) throw exhausted(`the manifest's ${layers.length} layers`, asCount(MAX_LAYERS, 'layers'), 'per image');
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
