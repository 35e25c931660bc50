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
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import * as tar from 'tar-stream';
import { AegisError, isAegisError } from '@aegis/protocol';
import { ContentStore } from './content-store.js';
import { runDebugfs, writeScript } from './debugfs.js';
import { LayerTree } from './layer-tree.js';
import { makeFilesystem, stage } from './mke2fs.js';

export interface LayerFile {
  path: string;
  mediaType: string;
}

export interface BuildOptions {
  signal?: AbortSignal;
  /** Where the staging tree goes; defaults to the output's directory, so renames stay on one filesystem. */
  workDir?: string;
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
  const tmpOut = `${outFile}.partial-${path.basename(work)}`;
  const store = new ContentStore(path.join(work, 'content'));
  try {
    await fs.mkdir(store.dir, { mode: 0o700 });
    const tree = new LayerTree(store);
    const digest = createHash('sha256');
    for (const [index, layer] of layers.entries()) {
      await applyLayer(tree, layer, index, digest, signal);
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
    await fs.rm(tmpOut, { force: true });
    if (signal?.aborted) throw new AegisError('CANCELLED', 'building the image filesystem was cancelled', { cause: err });
    throw AegisError.from(err);
  } finally {
    // A write still in flight after a failure would land in a tree already being removed.
    await store.settle();
    await fs.rm(work, { recursive: true, force: true });
  }
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

async function applyLayer(tree: LayerTree, layer: LayerFile, index: number, digest: Hash, signal: AbortSignal | undefined): Promise<void> {
  const compression = await detectCompression(layer);
  const extract = tar.extract();
  // Node's default 64 KiB reads and 16 KiB inflate chunks make gunzip three times slower than gzip(1).
  const streams: (NodeJS.ReadableStream | NodeJS.WritableStream)[] = [
    createReadStream(layer.path, { highWaterMark: 1 << 20 }),
    new Hasher(digest),
  ];
  if (compression === 'gzip') streams.push(createGunzip({ chunkSize: 256 << 10 }));
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
