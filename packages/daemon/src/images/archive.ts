import { createHash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import * as tar from 'tar-stream';
import { AegisError, isAegisError } from '@aegis/protocol';
import { sha256Digest, type BlobStore } from './blobs.js';
import { formatReference, parseReference, validateDigest } from './reference.js';
import {
  MAX_ARCHIVE_NAME_BYTES,
  MAX_DOCUMENT_BYTES,
  MAX_LAYERS,
  asBytes,
  asCount,
  exhausted,
  imageLimits,
  type ImageLimits,
} from './limits.js';
import {
  MEDIA_TYPES,
  checkLayerMediaType,
  hostPlatform,
  parseImageConfig,
  parseManifestDocument,
  selectManifest,
  type Descriptor,
  type ParsedManifest,
  type Platform,
} from './manifest.js';
import { imageFromManifest, type PulledImage } from './registry.js';

export interface ImportOptions {
  /**
   * The name the imported image gets, whatever the archive calls it (an archive from elsewhere
   * must not claim a name such as `python:3.12` the user did not give). For an OCI layout of
   * several images, the repository its tags are put under. Without it the archive's own names
   * are used, and an image it does not name is addressed by digest only.
   */
  name?: string;
  /** Which entry of a multi-platform index to import; defaults to the host's. */
  platform?: Platform;
  /** Lowers the limits of limits.ts; for tests. */
  limits?: Partial<ImageLimits>;
}

/**
 * Imports every image in a `docker save` tar or an OCI image-layout tar (optionally gzipped) into
 * `store`. Nothing in the archive is trusted: each blob is verified against the digest it is
 * referenced by before it is stored, and only blobs the imported images use are stored.
 *
 * The archive is read several times (metadata, then manifests and configs, then layers) rather
 * than buffered, so an archive of any size costs only the memory of its small JSON documents.
 */
export async function importArchive(tarPath: string, store: BlobStore, options: ImportOptions = {}): Promise<PulledImage[]> {
  const archive = await Archive.open(tarPath, imageLimits(options.limits));
  if (archive.meta.has('oci-layout') && archive.meta.has('index.json')) return importOciLayout(archive, store, options);
  if (archive.meta.has('manifest.json')) return importDockerSave(archive, store, options);
  throw new AegisError(
    'INVALID_ARGUMENT',
    `${path.basename(tarPath)} is neither a docker save archive nor an OCI image layout (no manifest.json or index.json)`,
  );
}

const METADATA_FILES = new Set(['manifest.json', 'index.json', 'oci-layout', 'repositories']);
const MAX_LINK_HOPS = 16;

interface EntryInfo {
  size: number;
  /** Set for links: the archive path whose data this entry shares. */
  target?: string;
}

/** One tar file, scanned on demand. Entry names are normalised (no `./`, no leading `/`). */
class Archive {
  private constructor(
    readonly file: string,
    private readonly gzipped: boolean,
    readonly entries: Map<string, EntryInfo>,
    readonly meta: Map<string, Buffer>,
    readonly limits: Readonly<ImageLimits>,
  ) {}

  static async open(file: string, limits: Readonly<ImageLimits>): Promise<Archive> {
    const head = Buffer.alloc(2);
    const fh = await fs.open(file, 'r').catch((err: Error) => {
      throw new AegisError('NOT_FOUND', `cannot open archive ${file}: ${err.message}`);
    });
    try {
      await fh.read(head, 0, 2, 0);
    } finally {
      await fh.close();
    }
    const archive = new Archive(file, head[0] === 0x1f && head[1] === 0x8b, new Map(), new Map(), limits);
    let entries = 0;
    await archive.scan(async (name, header, stream) => {
      // Every name is held until the import ends, so both their number and their length are bounded.
      if (++entries > limits.archiveEntries) throw exhausted('the archive', asCount(limits.archiveEntries, 'entries'), 'per archive');
      if (Buffer.byteLength(name) > MAX_ARCHIVE_NAME_BYTES) {
        throw new AegisError(
          'INVALID_ARGUMENT',
          `${JSON.stringify(name.slice(0, 80))}… in the archive is longer than ${MAX_ARCHIVE_NAME_BYTES} bytes, the limit per name`,
        );
      }
      if (header.type === 'symlink' || header.type === 'link') {
        const link = header.linkname ?? '';
        const target = header.type === 'symlink' ? path.posix.join(path.posix.dirname(name), link) : link;
        archive.entries.set(name, { size: 0, target: normalise(target) });
      } else if (header.type === 'file' || header.type === 'contiguous-file') {
        archive.entries.set(name, { size: header.size ?? 0 });
        if (METADATA_FILES.has(name)) archive.meta.set(name, await readAll(stream, MAX_DOCUMENT_BYTES, name));
      }
    });
    return archive;
  }

  /** The regular file an entry's data lives in, following links. */
  resolve(name: string): { name: string; size: number } | undefined {
    let current = normalise(name);
    for (let hops = 0; hops < MAX_LINK_HOPS; hops++) {
      const info = this.entries.get(current);
      if (!info) return undefined;
      if (info.target === undefined) return { name: current, size: info.size };
      current = info.target;
    }
    return undefined;
  }

  async scan(visit: (name: string, header: tar.Header, stream: Readable) => Promise<void>): Promise<void> {
    const extract = tar.extract();
    const source = createReadStream(this.file);
    const piping = this.gzipped ? pipeline(source, createGunzip(), extract) : pipeline(source, extract);
    piping.catch(() => undefined); // surfaced through the iterator below
    try {
      for await (const entry of extract) {
        const stream = entry as unknown as Readable;
        await visit(normalise(entry.header.name), entry.header, stream);
        stream.resume();
      }
      await piping;
    } catch (err) {
      source.destroy();
      if (isAegisError(err)) throw err;
      throw new AegisError('INVALID_ARGUMENT', `${path.basename(this.file)} is not a readable tar archive: ${(err as Error).message}`, {
        cause: err,
      });
    }
  }

  /** Reads the named entries whole (each at most MAX_DOCUMENT_BYTES), keyed by the name asked for. */
  async readDocuments(names: Iterable<string>): Promise<Map<string, Buffer>> {
    const byReal = new Map<string, string[]>();
    for (const name of names) {
      const real = this.resolve(name);
      if (!real) throw missing(this.file, name);
      byReal.set(real.name, [...(byReal.get(real.name) ?? []), name]);
    }
    const out = new Map<string, Buffer>();
    await this.scan(async (name, _header, stream) => {
      const wanted = byReal.get(name);
      if (!wanted) return;
      const bytes = await readAll(stream, MAX_DOCUMENT_BYTES, name);
      for (const w of wanted) out.set(w, bytes);
    });
    return out;
  }

  /** Streams the named entries into the store, each verified against its digest. */
  async ingest(store: BlobStore, blobs: Map<string, { digest: string; size?: number }>): Promise<void> {
    const byReal = new Map<string, { digest: string; size?: number }>();
    for (const [name, blob] of blobs) {
      const real = this.resolve(name);
      if (!real) throw missing(this.file, name);
      const other = byReal.get(real.name);
      if (other && other.digest !== blob.digest) {
        throw new AegisError('INVALID_ARGUMENT', `${real.name} in the archive is referenced as both ${other.digest} and ${blob.digest}`);
      }
      byReal.set(real.name, blob);
    }
    await this.scan(async (name, header, stream) => {
      const blob = byReal.get(name);
      if (!blob) return;
      await store.ingestStream(blob.digest, blob.size ?? header.size, stream);
    });
    for (const blob of byReal.values()) {
      if (!(await store.has(blob.digest))) throw new AegisError('INVALID_ARGUMENT', `the archive does not contain blob ${blob.digest}`);
    }
  }
}

function normalise(name: string): string {
  return path.posix.normalize(name.replace(/^(\.\/|\/)+/, '')).replace(/\/$/, '');
}

function missing(file: string, name: string): AegisError {
  return new AegisError('INVALID_ARGUMENT', `${path.basename(file)} references ${name}, which it does not contain`);
}

async function readAll(stream: Readable, max: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of stream as AsyncIterable<Buffer>) {
    total += chunk.length;
    if (total > max) throw exhausted(`${what} in the archive`, asBytes(max), 'per document');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function blobPath(digest: string): string {
  return `blobs/sha256/${validateDigest(digest).slice('sha256:'.length)}`;
}

function parseJson(bytes: Buffer, what: string): unknown {
  try {
    return JSON.parse(bytes.toString('utf8'));
  } catch {
    throw new AegisError('INVALID_ARGUMENT', `${what} in the archive is not valid JSON`);
  }
}

function canonicalName(name: string | undefined): string | undefined {
  if (name === undefined) return undefined;
  try {
    return formatReference(parseReference(name));
  } catch {
    return undefined;
  }
}

/**
 * Refuses an image whose layers, as stored, already exceed what it may unpack to, before any of
 * them is copied into the store (compressed layers only grow when unpacked).
 */
function checkLayerBytes(layers: { size: number }[], image: string, limits: Readonly<ImageLimits>): void {
  const total = layers.reduce((sum, l) => sum + l.size, 0);
  if (total > limits.unpackedBytesPerImage) {
    throw exhausted(`the layers of image ${image} in the archive`, asBytes(limits.unpackedBytesPerImage), 'unpacked per image');
  }
}

// ---- OCI image layout --------------------------------------------------------------------------

async function importOciLayout(archive: Archive, store: BlobStore, options: ImportOptions): Promise<PulledImage[]> {
  const layout = parseJson(archive.meta.get('oci-layout') ?? Buffer.alloc(0), 'oci-layout') as { imageLayoutVersion?: unknown };
  if (typeof layout?.imageLayoutVersion !== 'string' || !layout.imageLayoutVersion.startsWith('1.')) {
    throw new AegisError('UNSUPPORTED', 'the archive is an OCI image layout of an unsupported version');
  }
  const top = parseManifestDocument(archive.meta.get('index.json') ?? Buffer.alloc(0));
  if (top.kind !== 'index') throw new AegisError('INVALID_ARGUMENT', 'index.json in the archive is not an image index');
  const platform = options.platform ?? hostPlatform();
  const dockerNames = dockerSaveNames(archive);

  // Walk index → (index →) manifest, one archive pass per level, remembering which top-level entry led there.
  const found: { manifest: ParsedManifest; digest: string; bytes: Buffer; top: Descriptor }[] = [];
  let level = top.manifests.map((desc) => ({ desc, top: desc }));
  for (let depth = 0; level.length > 0; depth++) {
    if (depth > 2) throw new AegisError('UNSUPPORTED', 'the archive nests image indexes too deeply');
    const docs = await archive.readDocuments(level.map((l) => blobPath(l.desc.digest)));
    const next: typeof level = [];
    for (const { desc, top } of level) {
      const bytes = docs.get(blobPath(desc.digest)) as Buffer;
      verify(bytes, desc.digest, desc.size, 'manifest');
      const doc = parseManifestDocument(bytes, desc.mediaType);
      if (doc.kind === 'index') {
        next.push({ desc: selectManifest(doc, platform, desc.digest), top });
        await store.put(desc.digest, bytes);
      } else {
        found.push({ manifest: doc, digest: desc.digest, bytes, top });
      }
    }
    level = next;
  }

  const blobs = new Map<string, { digest: string; size: number }>();
  for (const { manifest, digest } of found) {
    for (const layer of manifest.layers) checkLayerMediaType(layer);
    checkLayerBytes(manifest.layers, digest, archive.limits);
    for (const d of [manifest.config, ...manifest.layers]) blobs.set(blobPath(d.digest), { digest: d.digest, size: d.size });
  }
  await archive.ingest(store, blobs);

  const images: PulledImage[] = [];
  for (const { manifest, digest, bytes, top } of found) {
    await store.put(digest, bytes);
    const configBytes = await store.read(manifest.config.digest, MAX_DOCUMENT_BYTES);
    // A name with its own tag (or digest) is the image's whole name; a bare repository takes the layout's tags.
    const whole = found.length === 1 && options.name !== undefined && /[:@][^/]*$/.test(options.name);
    const name = whole ? canonicalName(options.name) : nameOf(top, dockerNames.get(manifest.config.digest), options.name);
    images.push(imageFromManifest(manifest, digest, configBytes, name));
  }
  return images;
}

/**
 * An OCI layout names an image by `org.opencontainers.image.ref.name`, which tools fill with either
 * a full reference or just a tag; containerd and Docker also write the full name separately, and
 * Docker's manifest.json beside the layout has it too.
 */
function nameOf(desc: Descriptor, dockerName: string | undefined, fallback: string | undefined): string | undefined {
  const full = desc.annotations?.['io.containerd.image.name'];
  if (full) return canonicalName(full);
  const ref = desc.annotations?.['org.opencontainers.image.ref.name'];
  if (ref?.includes('/')) return canonicalName(ref);
  if (dockerName !== undefined) return dockerName;
  const base = canonicalName(fallback);
  if (!ref || base === undefined) return base;
  const parsed = parseReference(base);
  return canonicalName(`${parsed.registry}/${parsed.repository}:${ref}`);
}

function verify(bytes: Buffer, digest: string, size: number | undefined, what: string): void {
  const actual = sha256Digest(bytes);
  if (actual !== digest)
    throw new AegisError('INVALID_ARGUMENT', `${what} ${digest} in the archive does not match its digest (got ${actual})`);
  if (size !== undefined && bytes.length !== size) {
    throw new AegisError('INVALID_ARGUMENT', `${what} ${digest} in the archive is ${bytes.length} bytes, not the ${size} declared`);
  }
}

// ---- docker save -------------------------------------------------------------------------------

interface DockerSaveEntry {
  config: string;
  repoTags: string[];
  layers: string[];
}

function parseDockerManifest(archive: Archive): DockerSaveEntry[] {
  const doc = parseJson(archive.meta.get('manifest.json') ?? Buffer.alloc(0), 'manifest.json');
  const bad = (): AegisError => new AegisError('INVALID_ARGUMENT', 'manifest.json in the archive is not a docker save manifest');
  if (!Array.isArray(doc)) throw bad();
  return doc.map((e: unknown) => {
    if (typeof e !== 'object' || e === null) throw bad();
    const { Config, RepoTags, Layers } = e as Record<string, unknown>;
    if (typeof Config !== 'string' || !Array.isArray(Layers) || !Layers.every((l) => typeof l === 'string')) throw bad();
    if (Layers.length > MAX_LAYERS) throw exhausted('an image in manifest.json', asCount(MAX_LAYERS, 'layers'), 'per image');
    if (RepoTags !== undefined && RepoTags !== null && (!Array.isArray(RepoTags) || !RepoTags.every((t) => typeof t === 'string')))
      throw bad();
    return { config: Config, repoTags: (RepoTags as string[] | null | undefined) ?? [], layers: Layers as string[] };
  });
}

/** Config digest → first RepoTag, for naming the images of a Docker-written OCI layout. */
function dockerSaveNames(archive: Archive): Map<string, string> {
  const names = new Map<string, string>();
  if (!archive.meta.has('manifest.json')) return names;
  for (const entry of parseDockerManifest(archive)) {
    const hex = /(?:^|\/)([0-9a-f]{64})(?:\.json)?$/.exec(entry.config)?.[1];
    const name = canonicalName(entry.repoTags[0]);
    if (hex && name) names.set(`sha256:${hex}`, name);
  }
  return names;
}

async function importDockerSave(archive: Archive, store: BlobStore, options: ImportOptions): Promise<PulledImage[]> {
  const entries = parseDockerManifest(archive);
  if (options.name !== undefined && entries.length > 1) {
    throw new AegisError('INVALID_ARGUMENT', `the archive holds ${entries.length} images; --name names one (import it without --name)`);
  }
  const configs = await archive.readDocuments(entries.map((e) => e.config));

  // docker save writes layers uncompressed, so each layer's digest is its diff_id from the config.
  const plans = entries.map((entry) => {
    const bytes = configs.get(entry.config) as Buffer;
    const configDigest = sha256Digest(bytes);
    const named = /(?:^|\/)([0-9a-f]{64})(?:\.json)?$/.exec(entry.config)?.[1];
    if (named && `sha256:${named}` !== configDigest) {
      throw new AegisError('INVALID_ARGUMENT', `config ${entry.config} in the archive does not match its name (got ${configDigest})`);
    }
    const config = parseImageConfig(bytes);
    if (config.diffIds.length !== entry.layers.length) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `image ${configDigest} in the archive has ${entry.layers.length} layers but ${config.diffIds.length} diff_ids`,
      );
    }
    checkLayerBytes(
      entry.layers.map((l) => ({ size: archive.resolve(l)?.size ?? 0 })),
      configDigest,
      archive.limits,
    );
    return { entry, bytes, configDigest, diffIds: config.diffIds };
  });

  const blobs = new Map<string, { digest: string }>();
  for (const plan of plans) plan.entry.layers.forEach((layer, i) => blobs.set(layer, { digest: plan.diffIds[i] as string }));
  try {
    await archive.ingest(store, blobs);
  } catch (err) {
    if (isAegisError(err, 'INVALID_ARGUMENT') && /does not match/.test(err.message)) {
      throw new AegisError(
        'INVALID_ARGUMENT',
        `${err.message}; a layer of a docker save archive must be the uncompressed tar its config's diff_id names`,
      );
    }
    throw err;
  }

  const images: PulledImage[] = [];
  const unnamed = canonicalName(options.name);
  for (const { entry, bytes, configDigest, diffIds } of plans) {
    await store.put(configDigest, bytes);
    const layers: Descriptor[] = [];
    for (const [i, layer] of entry.layers.entries()) {
      const size = archive.resolve(layer)?.size ?? 0;
      layers.push({ mediaType: MEDIA_TYPES.dockerLayer, digest: diffIds[i] as string, size });
    }
    // The archive has no registry manifest; write the one a registry would have, so the image has a
    // digest to be addressed by, the same whichever archive it came from.
    const manifestDoc = {
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.dockerManifest,
      config: { mediaType: MEDIA_TYPES.dockerConfig, size: bytes.length, digest: configDigest },
      layers: layers.map((l) => ({ mediaType: l.mediaType, size: l.size, digest: l.digest })),
    };
    const manifestBytes = Buffer.from(JSON.stringify(manifestDoc));
    const manifestDigest = `sha256:${createHash('sha256').update(manifestBytes).digest('hex')}`;
    await store.put(manifestDigest, manifestBytes);
    const manifest: ParsedManifest = {
      kind: 'manifest',
      mediaType: MEDIA_TYPES.dockerManifest,
      config: { mediaType: MEDIA_TYPES.dockerConfig, size: bytes.length, digest: configDigest },
      layers,
    };
    const names = unnamed !== undefined ? [unnamed] : entry.repoTags.map(canonicalName).filter((n): n is string => n !== undefined);
    if (names.length === 0) images.push(imageFromManifest(manifest, manifestDigest, bytes));
    for (const name of names) images.push(imageFromManifest(manifest, manifestDigest, bytes, name));
  }
  return images;
}
