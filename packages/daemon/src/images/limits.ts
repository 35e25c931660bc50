/**
 * How much of an untrusted image (pulled or imported) aegisd will take in. An image's layers
 * become an in-memory tree of every path before one byte of its filesystem is written, so
 * without these a small archive of millions of empty files (an "import bomb": 200,000 of them
 * gzip to 2 MiB) could take the host's memory; each is counted as the tar streams, and the
 * image is refused the moment one is passed, so what was held stays bounded by the limit.
 *
 * "Too many" or "too big" is RESOURCE_EXHAUSTED; a path that no filesystem could hold is
 * INVALID_ARGUMENT. Each message names the limit and its figure.
 */
import { AegisError } from '@aegis/protocol';

export interface ImageLimits {
  /**
   * Tar entries in one layer, whiteouts and the parent directories a layer leaves out included.
   * Among the largest common images, a full TeX Live layer holds about 200,000 files and CUDA
   * or PyTorch development images about 100,000 over all their layers; 500,000 is well clear
   * of both, and bounds what one layer can make the daemon hold to about 120 MiB of tree.
   */
  entriesPerLayer: number;
  /** Entries over all of an image's layers (those a later layer replaces count too): 5× TeX Live. */
  entriesPerImage: number;
  /**
   * Bytes of the layers' tars once decompressed, over the whole image. The largest public images
   * (CUDA + ML stacks) unpack to 20–30 GB; past 64 GiB the prepared filesystem alone would
   * fill most hosts' disks, so that is refused as a bomb rather than tried.
   */
  unpackedBytesPerImage: number;
  /**
   * Names, symlink targets and extended attributes the tree keeps, summed over the image: what
   * the tree holds beyond its fixed cost per entry. A 1,000,000-entry image of ordinary names
   * needs about 30 MiB; without a budget, 4 KiB symlink targets would make the same count 4 GiB.
   */
  metadataBytesPerImage: number;
  /**
   * Directory levels under the root. The deepest paths in real images (nested node_modules,
   * Java packages) are a few dozen levels; this keeps the recursive walks over the tree shallow.
   */
  pathDepth: number;
  /**
   * PAX extended-header bytes applying to one entry (a global header applies to every entry
   * after it). An honest one holds a path, a link target, times and a few extended attributes,
   * none over 64 KiB (XATTR_SIZE_MAX), so 1 MiB is generous.
   */
  paxHeaderBytesPerEntry: number;
  /**
   * Entries in an imported archive itself (its blobs, manifests, layer directories): a `docker
   * save` of an image costs about four per layer, so 50,000 is a few thousand images' worth.
   * Every name is held while the archive is read.
   */
  archiveEntries: number;
}

export const DEFAULT_IMAGE_LIMITS: Readonly<ImageLimits> = Object.freeze({
  entriesPerLayer: 500_000,
  entriesPerImage: 1_000_000,
  unpackedBytesPerImage: 64 * 2 ** 30,
  metadataBytesPerImage: 64 * 2 ** 20,
  pathDepth: 256,
  paxHeaderBytesPerEntry: 2 ** 20,
  archiveEntries: 50_000,
});

/** Defaults with a test's overrides: limits are lowered only by tests, through options. */
export function imageLimits(overrides: Partial<ImageLimits> = {}): Readonly<ImageLimits> {
  return { ...DEFAULT_IMAGE_LIMITS, ...overrides };
}

/**
 * Manifests, indexes, configs and `manifest.json` are read whole; real ones are kilobytes (a
 * config with a long history a few hundred), so anything past 4 MiB is hostile or broken.
 */
export const MAX_DOCUMENT_BYTES = 4 * 2 ** 20;
/** Layers in a manifest and entries in an index; Docker's overlay2 stacks at most 128 layers. */
export const MAX_LAYERS = 1000;
// ext4 and the debugfs script's line buffer (BUFSIZ) bound these; longer names cannot be written.
export const MAX_NAME_BYTES = 255;
export const MAX_PATH_BYTES = 4095;
/** Names in an archive itself (blobs/sha256/<hex> is 71 bytes; docker save's are shorter still). */
export const MAX_ARCHIVE_NAME_BYTES = 1024;

/** The one-line refusal of something over a limit: what, the figure, and which limit it is. */
export function exhausted(what: string, limit: string, which: string): AegisError {
  return new AegisError('RESOURCE_EXHAUSTED', `${what} exceeds ${limit}, the limit ${which}`);
}

/** `1,000,000 entries` */
export function asCount(n: number, unit: string): string {
  return `${n.toLocaleString('en-US')} ${unit}`;
}

/** `64 GiB`, `4 MiB`, or bytes when not a whole number of either. */
export function asBytes(n: number): string {
  for (const [unit, size] of [
    ['GiB', 2 ** 30],
    ['MiB', 2 ** 20],
    ['KiB', 2 ** 10],
  ] as const) {
    if (n >= size && n % size === 0) return `${n / size} ${unit}`;
  }
  return asCount(n, 'bytes');
}
