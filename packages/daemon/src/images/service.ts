/**
 * Images as the daemon sees them: pulled (registry.ts) or imported (archive.ts) into the
 * content-addressed blob store, then prepared ONCE per digest into a read-only ext4 file
 * (layers.ts) that every instance of the image attaches as a disk, writing only to its own
 * layer. References (`docker.io/library/python:3.12`) point at digests in the registry.
 *
 * Layout under $AEGIS_HOME/images: blobs/ (BlobStore), fs/<key>.ext4 (prepared filesystems,
 * keyed by the layer chain: two tags that differ only in config share one).
 */
import { createHash } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { Logger } from '../log.js';
import type { Registry } from '../registry/db.js';
import { importArchive } from './archive.js';
import { BlobStore } from './blobs.js';
import { buildIsolated } from './build-isolated.js';
import type { ImageLimits } from './limits.js';
import type { ImageConfig } from './manifest.js';
import { formatReference, parseReference, validateDigest } from './reference.js';
import { pullImage, type LayerDescriptor, type PulledImage } from './registry.js';

/** What the registry keeps per image (its `image` JSON). */
interface StoredImage {
  config: ImageConfig;
  configDigest: string;
  layers: LayerDescriptor[];
  /** Bytes as distributed (config + layers). */
  sizeBytes: number;
  /** Bytes of the prepared filesystem file. */
  fsBytes: number;
  /** Names the prepared filesystem: images with the same layers (tags differing only in config) share it. */
  fsKey: string;
}

export type ImageView = ApiSchemas['Image'];

export interface ResolvedImage {
  digest: string;
  reference?: string;
  config: ImageConfig;
  /** The prepared filesystem, attached read-only to each instance. */
  fsPath: string;
}

/** What a pull reports; the `error` event is the server's, written when the stream fails. */
export type PullEvent = Exclude<ApiSchemas['PullEvent'], { type: 'error' }>;

export class ImageService {
  private readonly blobs: BlobStore;
  private readonly fsDir: string;
  /** One preparation per filesystem at a time; concurrent pulls of an image wait for the first. */
  private readonly preparing = new Map<string, Promise<number>>();

  constructor(
    home: string,
    private readonly registry: Registry,
    private readonly log: Logger,
    private readonly options: { insecureRegistries: string[]; /** For tests: lowers limits.ts's. */ limits?: Partial<ImageLimits> },
  ) {
    this.blobs = new BlobStore(path.join(home, 'images', 'blobs'));
    this.fsDir = path.join(home, 'images', 'fs');
  }

  private fsPath(fsKey: string): string {
    return path.join(this.fsDir, `${fsKey}.ext4`);
  }

  /** The filesystem is a function of the layers alone. */
  private static fsKeyOf(layers: LayerDescriptor[]): string {
    return createHash('sha256')
      .update(layers.map((l) => l.digest).join('\n'))
      .digest('hex');
  }

  private fsPathOf(digest: string): string | undefined {
    const s = this.stored(digest);
    return s && this.fsPath(s.image.fsKey);
  }

  list(): ImageView[] {
    return this.registry.listImages().map((r) => this.view(r.digest));
  }

  private stored(digest: string): { image: StoredImage; references: string[]; createdAt: number } | undefined {
    const row = this.registry.getImage(digest);
    return row && { image: JSON.parse(row.image) as StoredImage, references: row.references, createdAt: row.createdAt };
  }

  private view(digest: string): ImageView {
    const s = this.stored(digest);
    if (!s) throw new AegisError('NOT_FOUND', `no image ${digest}`);
    return {
      digest,
      references: s.references,
      sizeBytes: s.image.sizeBytes,
      fsBytes: s.image.fsBytes,
      storedAt: new Date(s.createdAt).toISOString(),
      ...(s.image.config.created ? { created: s.image.config.created } : {}),
      architecture: s.image.config.architecture,
    };
  }

  /** A reference, a digest (`sha256:…`), or a unique digest prefix, as Docker takes them. */
  private lookup(ref: string): { digest: string; reference?: string } | undefined {
    if (/^(sha256:)?[0-9a-f]{12,64}$/.test(ref)) {
      const hex = ref.replace(/^sha256:/, '');
      const matches = this.registry.listImages().filter((r) => r.digest.slice('sha256:'.length).startsWith(hex));
      if (matches.length > 1) throw new AegisError('INVALID_ARGUMENT', `"${ref}" matches more than one image; give more of the digest`);
      if (matches[0]) return { digest: matches[0].digest };
    }
    const parsed = parseReference(ref);
    const canonical = formatReference(parsed);
    // `name@sha256:…` pins content: a stored image with that digest is the one, whatever its tags.
    const digest =
      this.registry.imageDigestOf(canonical) ?? (parsed.digest && this.registry.getImage(parsed.digest) ? parsed.digest : undefined);
    return digest ? { digest, reference: canonical } : undefined;
  }

  get(ref: string): ImageView {
    const found = this.lookup(ref);
    if (!found) throw new AegisError('NOT_FOUND', `no image "${ref}" here (aegis image pull ${ref})`);
    return this.view(found.digest);
  }

  /** For an instance start: the local image, pulled first if this host does not have it. */
  async resolve(ref: string, signal?: AbortSignal): Promise<ResolvedImage> {
    let found = this.lookup(ref);
    const prepared = found && this.fsPathOf(found.digest);
    if (!found || !prepared || !existsSync(prepared)) {
      const view = await this.pull(ref, () => undefined, signal);
      found = { digest: view.digest, reference: formatReference(parseReference(ref)) };
    }
    const s = this.stored(found.digest);
    if (!s) throw new AegisError('NOT_FOUND', `image ${found.digest} vanished`);
    return { ...found, config: s.image.config, fsPath: this.fsPath(s.image.fsKey) };
  }

  /** The config and filesystem of an image an instance already runs (exec needs its config). */
  resolveDigest(digest: string): ResolvedImage {
    const s = this.stored(digest);
    if (!s) throw new AegisError('NOT_FOUND', `image ${digest} is no longer stored`);
    return { digest, config: s.image.config, fsPath: this.fsPath(s.image.fsKey) };
  }

  async pull(ref: string, emit: (ev: PullEvent) => void, signal?: AbortSignal): Promise<ImageView> {
    const parsed = parseReference(ref);
    const reference = formatReference(parsed);
    emit({ type: 'resolved', reference });
    const pulled = await pullImage(parsed, this.blobs, {
      insecureRegistries: this.options.insecureRegistries,
      onProgress: (p) => emit({ type: 'progress', ...p }),
      ...(signal ? { signal } : {}),
      ...(this.options.limits ? { limits: this.options.limits } : {}),
    });
    const known = this.fsPathOf(pulled.digest);
    const cached = known !== undefined && existsSync(known);
    // A tag that is not a digest reference names this image now (like docker pull).
    await this.store(pulled, [reference], emit, signal);
    const image = this.view(pulled.digest);
    emit({ type: 'done', image, cached });
    this.log.info(`image ${reference}: ${cached ? 'up to date' : 'pulled'} (${pulled.digest})`);
    return image;
  }

  async import(tarPath: string, name: string | undefined, signal?: AbortSignal): Promise<ImageView[]> {
    const st = await fs.stat(tarPath).catch(() => undefined);
    if (!st?.isFile()) throw new AegisError('NOT_FOUND', `${tarPath}: no such file (give a path aegisd can read)`);
    const images = await importArchive(tarPath, this.blobs, {
      ...(name ? { name } : {}),
      ...(this.options.limits ? { limits: this.options.limits } : {}),
    });
    const out: ImageView[] = [];
    try {
      for (const img of images) {
        await this.store(img, img.reference ? [img.reference] : [], () => undefined, signal);
        out.push(this.view(img.digest));
      }
    } catch (err) {
      // A refused archive (an import bomb, say) leaves nothing behind: unlike a pull's, its blobs
      // cannot be resumed, and the same file would be refused again.
      await this.discardUnused(images.filter((img) => !this.registry.getImage(img.digest)));
      throw err;
    }
    this.log.info(`imported ${images.length} image(s) from ${path.basename(tarPath)}`);
    return out;
  }

  private async store(img: PulledImage, references: string[], emit: (ev: PullEvent) => void, signal?: AbortSignal): Promise<void> {
    const fsKey = ImageService.fsKeyOf(img.layers);
    let pending = this.preparing.get(fsKey);
    if (!pending) {
      emit({ type: 'preparing', digest: img.digest });
      pending = this.prepare(img, fsKey, signal).finally(() => this.preparing.delete(fsKey));
      this.preparing.set(fsKey, pending);
    }
    const fsBytes = await pending;
    const stored: StoredImage = {
      config: img.config,
      configDigest: img.configDigest,
      layers: img.layers,
      sizeBytes: img.sizeBytes,
      fsBytes,
      fsKey,
    };
    this.registry.putImage(img.digest, JSON.stringify(stored), references, Date.now());
  }

  /** The filesystem, once per layer chain: a second pull or the tenth instance finds it made. */
  private async prepare(img: PulledImage, fsKey: string, signal?: AbortSignal): Promise<number> {
    const out = this.fsPath(fsKey);
    const done = await fs.stat(out).catch(() => undefined);
    if (done) return done.size;
    await fs.mkdir(this.fsDir, { recursive: true, mode: 0o700 });
    const t0 = Date.now();
    const layers = img.layers.map((l) => ({ path: this.blobs.path(l.digest), mediaType: l.mediaType }));
    const built = await buildIsolated(layers, out, {
      ...(signal ? { signal } : {}),
      ...(this.options.limits ? { limits: this.options.limits } : {}),
    });
    this.log.info(`image ${img.digest}: filesystem prepared in ${Date.now() - t0} ms (${built.fileCount} files)`);
    return built.sizeBytes;
  }

  /** Deletes the blobs of images that were never stored, unless a stored image uses them too. */
  private async discardUnused(images: PulledImage[]): Promise<void> {
    const used = this.blobsInUse();
    for (const img of images) {
      for (const blob of [img.digest, img.configDigest, ...img.layers.map((l) => l.digest)]) {
        if (!used.has(blob)) await fs.rm(this.blobs.path(validateDigest(blob)), { force: true });
      }
    }
  }

  /** Every digest a stored image names: its manifest, config, layers and filesystem key. */
  private blobsInUse(): Set<string> {
    return new Set(
      this.registry.listImages().flatMap((r) => {
        const img = JSON.parse(r.image) as StoredImage;
        return [r.digest, img.configDigest, img.fsKey, ...img.layers.map((l) => l.digest)];
      }),
    );
  }

  /**
   * `image rm`: a reference untags (the image goes with its last reference); a digest removes
   * the image and every reference. Refused while a live instance runs it. Blobs no other
   * image uses are deleted with it.
   */
  async remove(ref: string, inUseBy: (digest: string) => string | undefined): Promise<{ untagged: string[]; deleted?: string }> {
    const found = this.lookup(ref);
    if (!found) throw new AegisError('NOT_FOUND', `no image "${ref}" here`);
    const s = this.stored(found.digest);
    if (!s) throw new AegisError('NOT_FOUND', `no image "${ref}" here`);
    const untag = found.reference !== undefined && s.references.length > 1;
    const user = inUseBy(found.digest);
    if (user && !untag) {
      throw new AegisError('FAILED_PRECONDITION', `image ${ref} is in use by instance ${user}; delete the instance first`);
    }
    if (untag && found.reference) {
      this.registry.deleteImageRef(found.reference);
      return { untagged: [found.reference] };
    }
    this.registry.deleteImage(found.digest);
    const stillUsed = this.blobsInUse();
    if (!stillUsed.has(s.image.fsKey)) await fs.rm(this.fsPath(s.image.fsKey), { force: true });
    for (const blob of [found.digest, s.image.configDigest, ...s.image.layers.map((l) => l.digest)]) {
      if (!stillUsed.has(blob)) await fs.rm(this.blobs.path(validateDigest(blob)), { force: true });
    }
    return { untagged: s.references, deleted: found.digest };
  }
}
