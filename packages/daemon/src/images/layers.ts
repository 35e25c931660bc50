/**
 * Flattens an OCI image's layers into one read-only ext4 image a guest mounts as its root disk,
 * without root on the host.
 *
 * The layers are parsed once, in order, into an in-memory tree of metadata (the OCI whiteout and
 * replacement rules are applied there), while regular-file contents stream straight into a flat
 * content store. The surviving tree is then laid out in a staging directory holding only what an
 * unprivileged user can create (directories, contents, symlinks, hard links), `mke2fs -d` copies
 * it, and one `debugfs -w` script writes what only root could have set on the host: owners,
 * modes, times, device nodes, fifos and extended attributes. fakeroot could record ownership too,
 * but it works by intercepting libc calls in Node and mke2fs, which libuv's direct syscalls
 * bypass; debugfs edits the filesystem itself and ships with mke2fs.
 *
 * Beside this file: layer-tree.ts applies the OCI rules to tar entries, content-store.ts holds
 * file contents, mke2fs.ts stages the tree and makes the filesystem, debugfs.ts sets the rest.
 */
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, promises as fs, type Dir } from 'node:fs';
import path from 'node:path';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import * as tar from 'tar-stream';
import { AegisError, isAegisError } from '@aegis/protocol';
import { ContentStore, MAX_PENDING_WRITES } from './content-store.js';
import { runDebugfs, writeScript } from './debugfs.js';
import { LayerTree } from './layer-tree.js';
import { asBytes, exhausted, imageLimits, type ImageLimits } from './limits.js';
import { makeFilesystem, stage } from './mke2fs.js';

export interface LayerFile {
  path: string;
  mediaType: string;
}

export interface BuildOptions {
  signal?: AbortSignal;
  /** Where the staging tree goes; defaults to the output's directory, so renames stay on one filesystem. */
  workDir?: string;
  /** Lowers the limits of limits.ts; for tests. */
  limits?: Partial<ImageLimits>;
}

export interface BuiltFilesystem {
  sizeBytes: number;
  /** Paths in the image other than its root directory; a hard link counts once per name. */
  fileCount: number;
}

/**
 * Builds `outFile`, an ext4 image without a journal holding the union of `layers` (lowest first)
 * under the OCI image-spec rules. Layers are plain or gzip-compressed tars; everything in them is
 * untrusted. The file is replaced atomically and sized to its contents.
 */
export async function buildImageFilesystem(layers: LayerFile[], outFile: string, options: BuildOptions = {}): Promise<BuiltFilesystem> {
  const { signal } = options;
  checkAborted(signal);
  const workRoot = path.resolve(options.workDir ?? path.dirname(outFile));
  await fs.mkdir(workRoot, { recursive: true });
  const work = await fs.mkdtemp(path.join(workRoot, '.layers-'));
  // Inside the work directory, so that whatever a failed build leaves goes with it.
  const tmpOut = path.join(work, 'filesystem.ext4');
  const store = new ContentStore(path.join(work, 'content'));
  try {
    await fs.mkdir(store.dir, { mode: 0o700 });
    const limits = imageLimits(options.limits);
    const tree = new LayerTree(store, limits);
    const digest = createHash('sha256');
    const meter = { bytes: 0, limit: limits.unpackedBytesPerImage };
    for (const [index, layer] of layers.entries()) {
      await applyLayer(tree, layer, index, digest, meter, signal);
    }
    await store.flush();
    checkAborted(signal);

    const staging = path.join(work, 'root');
    const plan = await stage(tree, staging, store);
    checkAborted(signal);
    const script = await writeScript(tree, plan, work);
    const seed = digest.digest();
    await makeFilesystem(tmpOut, staging, plan, seed, signal);
    await runDebugfs(tmpOut, script, plan.epoch, signal);
    await fs.rename(tmpOut, outFile);
    return { sizeBytes: (await fs.stat(outFile)).size, fileCount: plan.names };
  } catch (err) {
    if (signal?.aborted) throw new AegisError('CANCELLED', 'building the image filesystem was cancelled', { cause: err });
    throw AegisError.from(err);
  } finally {
    // A write still in flight after a failure would land in a tree already being removed.
    await store.settle();
    await removeTree(work);
  }
}

/**
 * `rm -rf` in bounded memory. Node 20's `fs.rm({ recursive })` starts a removal for every entry
 * of a directory at once: 400 MiB of RSS for a staging tree of 200,000 files, which is what an
 * image with that many (or a refused import bomb's leftovers) leaves here.
 */
export async function removeTree(dir: string): Promise<void> {
  let handle: Dir;
  try {
    handle = await fs.opendir(dir);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return;
    if (code === 'ENOTDIR') return fs.rm(dir, { force: true });
    throw err;
  }
  let unlinks: Promise<void>[] = [];
  for await (const entry of handle) {
    const p = path.join(dir, entry.name);
    if (entry.isDirectory()) await removeTree(p);
    else unlinks.push(fs.unlink(p));
    if (unlinks.length >= MAX_PENDING_WRITES) {
      await Promise.all(unlinks);
      unlinks = [];
    }
  }
  await Promise.all(unlinks);
  await fs.rmdir(dir);
}

// ---- reading layers ----------------------------------------------------------------------------

type Compression = 'none' | 'gzip';

async function detectCompression(layer: LayerFile): Promise<Compression> {
  const type = layer.mediaType;
  if (/zstd/i.test(type)) {
    throw new AegisError(
      'UNSUPPORTED',
      `layer ${layer.path} is zstd-compressed (${type}), which is not supported yet; rebuild the image with gzip layers`,
    );
  }
  if (!type.includes('tar')) {
    throw new AegisError('UNSUPPORTED', `layer ${layer.path} has media type ${JSON.stringify(type)}, which is not a filesystem layer`);
  }
  const fh = await fs.open(layer.path, 'r').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new AegisError('NOT_FOUND', `layer ${layer.path} does not exist`);
    throw err;
  });
  const magic = Buffer.alloc(6);
  try {
    await fh.read(magic, 0, magic.length, 0);
  } finally {
    await fh.close();
  }
  // The bytes decide, not the label: docker-archive exports name gzipped layers plain tar and back.
  if (magic[0] === 0x1f && magic[1] === 0x8b) return 'gzip';
  if (magic.readUInt32LE(0) === 0xfd2fb528) {
    throw new AegisError(
      'UNSUPPORTED',
      `layer ${layer.path} is zstd-compressed although labelled ${type}; rebuild the image with gzip layers`,
    );
  }
  if (magic.subarray(0, 3).toString('latin1') === 'BZh' || magic.equals(Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00]))) {
    throw new AegisError(
      'UNSUPPORTED',
      `layer ${layer.path} is bzip2- or xz-compressed, which is not supported; rebuild the image with gzip layers`,
    );
  }
  return 'none';
}

/**
 * Counts the bytes of the decompressed tars over the whole image. The tree refuses a file on the
 * size its header declares; this catches the rest (tar-stream skips zero blocks without an entry,
 * so a gzip of zeros would otherwise run for as long as it inflates).
 */
class Meter extends Transform {
  constructor(private readonly meter: { bytes: number; limit: number }) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.meter.bytes += chunk.length;
    if (this.meter.bytes > this.meter.limit) done(exhausted('the image unpacked', asBytes(this.meter.limit), 'per image'));
    else done(null, chunk);
  }
}

/** Passes bytes through while hashing them, so the layer is read only once. */
class Hasher extends Transform {
  constructor(private readonly hash: Hash) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.hash.update(chunk);
    done(null, chunk);
  }
}

async function applyLayer(
  tree: LayerTree,
  layer: LayerFile,
  index: number,
  digest: Hash,
  meter: { bytes: number; limit: number },
  signal: AbortSignal | undefined,
): Promise<void> {
  const compression = await detectCompression(layer);
  const extract = tar.extract();
  // Node's default 64 KiB reads and 16 KiB inflate chunks make gunzip three times slower than gzip(1).
  const streams: (NodeJS.ReadableStream | NodeJS.WritableStream)[] = [
    createReadStream(layer.path, { highWaterMark: 1 << 20 }),
    new Hasher(digest),
  ];
  if (compression === 'gzip') streams.push(createGunzip({ chunkSize: 256 << 10 }));
  streams.push(new Meter(meter));
  const piped = pipeline([...streams, extract], signal ? { signal } : {});
  // The loop below reports the first failure; this only keeps a rejection from going unhandled.
  piped.catch(() => undefined);
  const where = `layer ${index + 1} (${path.basename(layer.path)})`;
  try {
    for await (const entry of extract) {
      checkAborted(signal);
      await tree.apply(entry, index, where);
    }
    await piped;
  } catch (err) {
    if (isAegisError(err) || signal?.aborted) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOSPC' || code === 'EDQUOT')
      throw new AegisError('RESOURCE_EXHAUSTED', `no space left to unpack ${where}`, { cause: err });
    if (typeof code === 'string' && code.startsWith('E')) throw AegisError.from(err);
    // zlib and tar-stream errors: the layer itself is damaged or not a tar.
    throw new AegisError('INVALID_ARGUMENT', `${where} is not a readable tar: ${(err as Error).message}`, { cause: err });
  }
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AegisError('CANCELLED', 'building the image filesystem was cancelled');
}
