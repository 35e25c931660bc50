/**
 * Pulls an image: resolves its reference to a platform manifest, then fetches the config and the
 * layers into the blob store, so that everything later steps read has been checked against a digest.
 */
import { AegisError } from '@aegis/protocol';
import { sha256Digest, type BlobStore } from './blobs.js';
import { loadDockerCredentials, type Credentials } from './credentials.js';
import { MAX_DOCUMENT_BYTES, asBytes, exhausted, imageLimits, type ImageLimits } from './limits.js';
import {
  checkLayerMediaType,
  hostPlatform,
  parseImageConfig,
  parseManifestDocument,
  selectManifest,
  type ImageConfig,
  type ParsedManifest,
  type Platform,
} from './manifest.js';
import { formatReference, registryHost, type ImageReference } from './reference.js';
import { RegistryClient } from './registry-client.js';

const LAYER_CONCURRENCY = 3;

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

export interface PullProgress {
  digest: string;
  doneBytes: number;
  totalBytes: number;
  phase: 'layer' | 'config' | 'manifest';
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
  /** Lowers the limits of limits.ts; for tests. */
  limits?: Partial<ImageLimits>;
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
    throw exhausted(`image config ${configDesc.digest} (${configDesc.size} bytes)`, asBytes(MAX_DOCUMENT_BYTES), 'per document');
  }
  // Downloads stop at the size a descriptor declares, so this bounds what the pull writes; the
  // layers only grow when unpacked, where the rest of the limits apply.
  const unpackedLimit = imageLimits(options.limits).unpackedBytesPerImage;
  if (manifest.layers.reduce((sum, l) => sum + l.size, 0) > unpackedLimit) {
    throw exhausted(`the layers of ${formatReference(ref)}`, asBytes(unpackedLimit), 'unpacked per image');
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
