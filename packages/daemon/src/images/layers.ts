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
 */
import { spawn } from 'node:child_process';
import { createHash, type Hash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import * as tar from 'tar-stream';
import { AegisError, isAegisError } from '@aegis/protocol';

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

type Kind = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo';

interface Inode {
  kind: Kind;
  /** Permission bits including setuid, setgid and sticky; the file type comes from `kind`. */
  perm: number;
  uid: number;
  gid: number;
  mtime: number;
  size: number;
  /** Content store id; absent for empty files and everything that is not a regular file. */
  blob: number | undefined;
  target: string;
  major: number;
  minor: number;
  xattrs: Map<string, Buffer> | undefined;
  /** Names in the tree referring to this inode; its content is dropped when the last goes. */
  names: number;
}

/** One tar entry as tar-stream yields it: its header, then its data. */
type TarEntry = AsyncIterable<unknown> & { header: tar.Header };

interface TreeNode {
  inode: Inode;
  children: Map<string, TreeNode> | undefined;
  /** The layer that last wrote this name; whiteouts only hide what lower layers wrote. */
  layer: number;
}

const BLOCK_BYTES = 4096;
const INODE_BYTES = 256;
const BLOCKS_PER_GROUP = 32768;
// ext4 and the debugfs script's line buffer (BUFSIZ) bound these; longer names cannot be written.
const MAX_NAME_BYTES = 255;
const MAX_PATH_BYTES = 4095;
const MAX_SYMLINK_HOPS = 40;
// Contents up to this size are buffered and written in the background, so thousands of small
// files do not each cost a round trip through the thread pool before the next entry is read.
const SMALL_FILE_BYTES = 1 << 20;
const MAX_PENDING_WRITES = 64;
const MAX_PENDING_BYTES = 64 << 20;
const WHITEOUT = '.wh.';
const OPAQUE = '.wh..wh..opq';
// Namespaces the guest kernel can store on ext4; anything else would become an unreadable attribute.
const XATTR_PREFIXES = ['user.', 'trusted.', 'security.', 'system.posix_acl_access', 'system.posix_acl_default'];

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

// ---- the merged tree ---------------------------------------------------------------------------

class LayerTree {
  readonly root: TreeNode = { inode: newInode('dir', 0o755), children: new Map(), layer: -1 };

  constructor(private readonly store: ContentStore) {
    this.root.inode.names = 1;
  }

  async apply(entry: TarEntry, layer: number, where: string): Promise<void> {
    const header = entry.header;
    const pax = (header.pax ?? undefined) as Record<string, string> | undefined;
    const name = header.name;
    const fail = (code: 'INVALID_ARGUMENT' | 'UNSUPPORTED', why: string): never => {
      throw new AegisError(code, `${where}: ${JSON.stringify(name)}: ${why}`);
    };
    if (pax && Object.keys(pax).some((k) => k.startsWith('GNU.sparse.'))) fail('UNSUPPORTED', 'GNU sparse files are not supported');
    const parts = splitName(name, fail);
    const base = parts.at(-1);

    if (base !== undefined && base.startsWith(WHITEOUT)) {
      await drain(entry);
      const dir = this.lookupDir(parts.slice(0, -1), fail);
      if (!dir?.children) return;
      if (base === OPAQUE) {
        this.hideLower(dir, layer);
      } else if (!base.startsWith(WHITEOUT + WHITEOUT)) {
        // `.wh..wh.*` other than the opaque marker is aufs bookkeeping with no meaning here.
        const hidden = base.slice(WHITEOUT.length);
        const victim = dir.children.get(hidden);
        if (victim && victim.layer < layer) {
          this.hideLower(victim, layer);
          if (!victim.children?.size) this.unlink(dir, hidden);
        }
      }
      return;
    }

    const inode = await this.inodeFor(entry, pax, fail);
    if (base === undefined) {
      if (inode.kind !== 'dir') fail('INVALID_ARGUMENT', 'the root of the image must be a directory');
      copyMetadata(this.root.inode, inode);
      this.root.layer = layer;
      return;
    }
    const { dir, depth } = this.walk(parts.slice(0, -1), layer, fail);
    if (depth + Buffer.byteLength(base) + 1 > MAX_PATH_BYTES) fail('INVALID_ARGUMENT', `the path is longer than ${MAX_PATH_BYTES} bytes`);
    const children = dir.children!;
    if (dir === this.root && base === 'lost+found' && inode.kind !== 'dir') {
      fail('UNSUPPORTED', '/lost+found must be a directory on ext4');
    }
    const existing = children.get(base);
    if (existing?.inode === inode) {
      existing.layer = layer;
      return;
    }
    if (existing?.children && inode.kind === 'dir') {
      copyMetadata(existing.inode, inode);
      existing.layer = layer;
      return;
    }
    // Counted before the old name goes, so a link to something inside what it replaces survives.
    inode.names++;
    if (existing) this.unlink(dir, base);
    children.set(base, { inode, children: inode.kind === 'dir' ? new Map() : undefined, layer });
  }

  /** Consumes the entry's data exactly once. */
  private async inodeFor(
    entry: TarEntry,
    pax: Record<string, string> | undefined,
    fail: (code: 'INVALID_ARGUMENT' | 'UNSUPPORTED', why: string) => never,
  ): Promise<Inode> {
    const h = entry.header;
    if (h.type === 'link') {
      await drain(entry);
      const target = splitName(h.linkname ?? '', fail);
      const name = target.at(-1);
      const node = name === undefined ? undefined : this.lookupDir(target.slice(0, -1), fail)?.children?.get(name);
      if (!node) fail('INVALID_ARGUMENT', `hard link target ${JSON.stringify(h.linkname)} is not in this or an earlier layer`);
      if (node.inode.kind === 'dir') fail('INVALID_ARGUMENT', 'hard links to directories are not allowed');
      return node.inode;
    }
    const kind = kindOf(h.type);
    if (!kind) {
      await drain(entry);
      return fail('UNSUPPORTED', `tar entry type ${h.type ?? 'unknown'} is not supported`);
    }
    const inode = newInode(kind, (h.mode ?? 0o644) & 0o7777);
    inode.uid = idFrom(pax?.['uid'], h.uid, fail);
    inode.gid = idFrom(pax?.['gid'], h.gid, fail);
    inode.mtime = timeFrom(pax?.['mtime'], h.mtime);
    inode.xattrs = xattrsFrom(pax);
    if (kind === 'symlink') {
      inode.target = h.linkname ?? '';
      if (!inode.target || inode.target.includes('\0')) fail('INVALID_ARGUMENT', 'symlink target is empty or holds a NUL');
      if (Buffer.byteLength(inode.target) > MAX_PATH_BYTES) fail('INVALID_ARGUMENT', 'symlink target is too long');
    } else if (kind === 'char' || kind === 'block') {
      inode.major = h.devmajor ?? 0;
      inode.minor = h.devminor ?? 0;
      // debugfs's mknod takes at most 16 bits of each; no device a container needs is larger.
      if (inode.major > 0xffff || inode.minor > 0xffff) fail('UNSUPPORTED', `device number ${inode.major}:${inode.minor} is too large`);
    }
    inode.size = kind === 'file' ? (h.size ?? 0) : 0;
    if (inode.size > 0) inode.blob = await this.store.add(entry, inode.size);
    else await drain(entry);
    return inode;
  }

  /** Resolves a directory by name, creating missing ones; symlinks on the way resolve inside the tree. */
  private walk(parts: string[], layer: number, fail: (code: 'INVALID_ARGUMENT', why: string) => never): { dir: TreeNode; depth: number } {
    const found = this.resolve(parts, fail, layer);
    if (!found) throw new Error('unreachable: walk creates what is missing');
    return found;
  }

  private lookupDir(parts: string[], fail: (code: 'INVALID_ARGUMENT', why: string) => never): TreeNode | undefined {
    return this.resolve(parts, fail, undefined)?.dir;
  }

  /**
   * Like the kernel's lookup within a chroot: `..` stops at the root and absolute symlinks restart
   * from it, so no name can reach outside the image. With `createIn`, missing directories are made.
   */
  private resolve(
    parts: string[],
    fail: (code: 'INVALID_ARGUMENT', why: string) => never,
    createIn: number | undefined,
  ): { dir: TreeNode; depth: number } | undefined {
    const stack: TreeNode[] = [this.root];
    const lengths: number[] = [0];
    const queue = [...parts];
    let hops = 0;
    for (let part = queue.shift(); part !== undefined; part = queue.shift()) {
      if (part === '' || part === '.') continue;
      if (part === '..') {
        if (stack.length > 1) {
          stack.pop();
          lengths.pop();
        }
        continue;
      }
      const dir = stack.at(-1)!;
      let child = dir.children!.get(part);
      if (!child) {
        if (createIn === undefined) return undefined;
        // Parents a layer leaves out get what `mkdir -p` would give them.
        child = { inode: newInode('dir', 0o755), children: new Map(), layer: createIn };
        child.inode.names = 1;
        dir.children!.set(part, child);
      }
      if (child.inode.kind === 'symlink') {
        if (++hops > MAX_SYMLINK_HOPS) fail('INVALID_ARGUMENT', 'too many levels of symbolic links');
        if (child.inode.target.startsWith('/')) {
          stack.length = 1;
          lengths.length = 1;
        }
        queue.unshift(...child.inode.target.split('/'));
        continue;
      }
      if (!child.children) {
        if (createIn === undefined) return undefined;
        fail('INVALID_ARGUMENT', `${JSON.stringify(part)} is not a directory`);
      }
      stack.push(child);
      lengths.push(lengths.at(-1)! + Buffer.byteLength(part) + 1);
      if (lengths.at(-1)! > MAX_PATH_BYTES) fail('INVALID_ARGUMENT', `the path is longer than ${MAX_PATH_BYTES} bytes`);
    }
    return { dir: stack.at(-1)!, depth: lengths.at(-1)! };
  }

  /** Removes everything below `dir` that lower layers wrote, keeping what this layer wrote. */
  private hideLower(dir: TreeNode, layer: number): void {
    if (!dir.children) return;
    for (const [name, child] of dir.children) {
      this.hideLower(child, layer);
      if (child.layer < layer && !child.children?.size) this.unlink(dir, name);
    }
  }

  private unlink(dir: TreeNode, name: string): void {
    const node = dir.children!.get(name);
    if (!node) return;
    dir.children!.delete(name);
    const release = (n: TreeNode): void => {
      if (n.children) for (const c of n.children.values()) release(c);
      if (--n.inode.names === 0 && n.inode.blob !== undefined) this.store.discard(n.inode.blob);
    };
    release(node);
  }
}

function newInode(kind: Kind, perm: number): Inode {
  return { kind, perm, uid: 0, gid: 0, mtime: 0, size: 0, blob: undefined, target: '', major: 0, minor: 0, xattrs: undefined, names: 0 };
}

function copyMetadata(to: Inode, from: Inode): void {
  to.perm = from.perm;
  to.uid = from.uid;
  to.gid = from.gid;
  to.mtime = from.mtime;
  to.xattrs = from.xattrs;
}

function kindOf(type: tar.Header['type'] | null): Kind | undefined {
  switch (type) {
    case 'file':
    case 'contiguous-file':
      return 'file';
    case 'directory':
      return 'dir';
    case 'symlink':
      return 'symlink';
    case 'character-device':
      return 'char';
    case 'block-device':
      return 'block';
    case 'fifo':
      return 'fifo';
    default:
      return undefined;
  }
}

/**
 * An entry name as path components. `..` is refused outright rather than resolved: no honest layer
 * needs it, and a name must not be able to climb out through a directory a later entry replaces.
 */
function splitName(name: string, fail: (code: 'INVALID_ARGUMENT' | 'UNSUPPORTED', why: string) => never): string[] {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  for (const part of parts) {
    if (part === '..') fail('INVALID_ARGUMENT', 'path traversal (`..`) is not allowed');
    if (Buffer.byteLength(part) > MAX_NAME_BYTES) fail('INVALID_ARGUMENT', `a name is longer than ${MAX_NAME_BYTES} bytes`);
    // The debugfs script is line-based, and tar-stream turns bytes that are not UTF-8 into U+FFFD.
    if (/[\0\n\r]/.test(part)) fail('UNSUPPORTED', 'names containing NUL, CR or LF are not supported');
    if (part.includes('\ufffd')) fail('UNSUPPORTED', 'names that are not valid UTF-8 are not supported');
  }
  return parts;
}

function idFrom(paxValue: string | undefined, value: number | undefined, fail: (code: 'INVALID_ARGUMENT', why: string) => never): number {
  const id = paxValue !== undefined ? Number(paxValue) : (value ?? 0);
  if (!Number.isSafeInteger(id) || id < 0 || id > 0xfffffffe) fail('INVALID_ARGUMENT', `owner id ${paxValue ?? value} is out of range`);
  return id;
}

// ext4 stores seconds from 1901 to 2446 with extra epoch bits; debugfs cannot write -1 or earlier.
const MAX_TIME = 2 ** 34 - 1;

function timeFrom(paxValue: string | undefined, value: Date | undefined): number {
  const seconds = paxValue !== undefined ? Math.floor(Number(paxValue)) : Math.floor((value?.getTime() ?? 0) / 1000);
  return Number.isFinite(seconds) ? Math.min(Math.max(seconds, 0), MAX_TIME) : 0;
}

function xattrsFrom(pax: Record<string, string> | undefined): Map<string, Buffer> | undefined {
  if (!pax) return undefined;
  let xattrs: Map<string, Buffer> | undefined;
  for (const [key, value] of Object.entries(pax)) {
    if (!key.startsWith('SCHILY.xattr.')) continue;
    const name = key.slice('SCHILY.xattr.'.length);
    if (!XATTR_PREFIXES.some((p) => name.startsWith(p)) || /[\0\n\r]/.test(name)) continue;
    // tar-stream decodes PAX values as UTF-8, so a binary value that was not UTF-8 is already
    // damaged; leaving it out fails closed (e.g. a capability not granted) rather than corrupting it.
    if (value.includes('\ufffd')) continue;
    (xattrs ??= new Map()).set(name, Buffer.from(value, 'utf8'));
  }
  return xattrs;
}

/** Reads an entry's data to its end; tar-stream's entries are streamx streams, so this is the portable way. */
async function drain(entry: AsyncIterable<unknown>): Promise<void> {
  for await (const chunk of entry) void chunk;
}

// ---- regular-file contents ---------------------------------------------------------------------

/** Contents of regular files, one file per id, written as they stream out of the layers. */
class ContentStore {
  private next = 0;
  private readonly pending = new Map<number, Promise<void>>();
  private pendingBytes = 0;
  private failure: unknown;

  constructor(readonly dir: string) {}

  pathOf(id: number): string {
    return path.join(this.dir, String(id));
  }

  async add(entry: AsyncIterable<unknown>, size: number): Promise<number> {
    this.check();
    const id = this.next++;
    const file = this.pathOf(id);
    if (size > SMALL_FILE_BYTES) {
      const fh = await fs.open(file, 'wx', 0o600);
      try {
        for await (const chunk of entry) await fh.write(chunk as Uint8Array);
      } finally {
        await fh.close();
      }
      return id;
    }
    const chunks: Uint8Array[] = [];
    for await (const chunk of entry) chunks.push(chunk as Uint8Array);
    const data = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    this.track(id, fs.writeFile(file, data, { flag: 'wx', mode: 0o600 }), data.length);
    while (this.pending.size >= MAX_PENDING_WRITES || this.pendingBytes >= MAX_PENDING_BYTES) {
      await Promise.race(this.pending.values());
    }
    return id;
  }

  /** Deletes a content a later layer made unreachable, once its write has finished. */
  discard(id: number): void {
    const written = this.pending.get(id) ?? Promise.resolve();
    this.track(
      id,
      written.then(() => fs.unlink(this.pathOf(id))),
      0,
    );
  }

  /** Waits for every write, ignoring failures: for cleaning up after one. */
  async settle(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled(this.pending.values());
  }

  async flush(): Promise<void> {
    while (this.pending.size > 0) await Promise.all(this.pending.values());
    this.check();
  }

  private track(id: number, work: Promise<void>, bytes: number): void {
    this.pendingBytes += bytes;
    const done: Promise<void> = work
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => {
        this.pendingBytes -= bytes;
        if (this.pending.get(id) === done) this.pending.delete(id);
      });
    this.pending.set(id, done);
  }

  private check(): void {
    if (this.failure !== undefined) throw this.failure;
  }
}

// ---- staging -----------------------------------------------------------------------------------

interface Plan {
  /** Every name in the tree with its absolute path, parents before children. */
  entries: { path: string; node: TreeNode }[];
  /** Path of the first name of each inode: the one its metadata is written through. */
  primary: Map<Inode, string>;
  names: number;
  inodes: number;
  blocks: number;
  /** Newest mtime in the image; stands in for "now" wherever e2fsprogs would stamp the clock. */
  epoch: number;
}

/**
 * Lays the tree out on the host as the current user: directories (0700, so we can traverse them),
 * file contents (0600), symlinks and hard links. Special files are left to debugfs.
 */
async function stage(tree: LayerTree, staging: string, store: ContentStore): Promise<Plan> {
  const plan: Plan = { entries: [], primary: new Map(), names: 0, inodes: 0, blocks: 0, epoch: 1 };
  const visit = (node: TreeNode, abs: string): void => {
    plan.entries.push({ path: abs, node });
    if (!node.children) return;
    for (const [name, child] of node.children) visit(child, abs === '/' ? `/${name}` : `${abs}/${name}`);
  };
  visit(tree.root, '/');
  plan.names = plan.entries.length - 1;

  await fs.mkdir(staging, { mode: 0o700 });
  const host = (abs: string): string => path.join(staging, abs);
  const links: { from: string; to: string }[] = [];
  const leaves: (() => Promise<void>)[] = [];
  for (const { path: abs, node } of plan.entries) {
    const inode = node.inode;
    plan.epoch = Math.max(plan.epoch, inode.mtime);
    plan.blocks += direntBlocks(abs);
    const first = plan.primary.get(inode);
    if (first !== undefined && inode.kind === 'symlink') {
      // mke2fs -d copies a hard-linked symlink as a second symlink, so stage it as one; the script
      // then gives every symlink name its own metadata.
      plan.inodes++;
      plan.blocks += inodeBlocks(node);
      leaves.push(() => fs.symlink(inode.target, host(abs)));
      continue;
    }
    if (first !== undefined) {
      if (inode.kind === 'file') links.push({ from: host(first), to: host(abs) });
      continue;
    }
    plan.primary.set(inode, abs);
    plan.inodes++;
    plan.blocks += inodeBlocks(node);
    if (node.children) {
      if (abs !== '/') await fs.mkdir(host(abs), { mode: 0o700 });
    } else if (inode.kind === 'file') {
      const blob = inode.blob;
      leaves.push(() =>
        blob === undefined ? fs.writeFile(host(abs), '', { flag: 'wx', mode: 0o600 }) : fs.rename(store.pathOf(blob), host(abs)),
      );
    } else if (inode.kind === 'symlink') {
      leaves.push(() => fs.symlink(inode.target, host(abs)));
    }
  }
  await inParallel(leaves, MAX_PENDING_WRITES);
  await inParallel(
    links.map((l) => () => fs.link(l.from, l.to)),
    MAX_PENDING_WRITES,
  );
  return plan;
}

async function inParallel(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < tasks.length) await tasks[next++]!();
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
}

function direntBlocks(abs: string): number {
  // A directory entry costs 8 bytes plus the name rounded up to 4; charged to the parent as blocks.
  const name = abs.slice(abs.lastIndexOf('/') + 1);
  return (8 + Math.ceil(Buffer.byteLength(name) / 4) * 4) / (BLOCK_BYTES - 12);
}

function inodeBlocks(node: TreeNode): number {
  const inode = node.inode;
  let blocks = 0;
  if (inode.kind === 'file') {
    const data = Math.ceil(inode.size / BLOCK_BYTES);
    // An extent covers at most 32768 blocks; past four extents the tree needs index blocks.
    blocks += data + (data > 4 * BLOCKS_PER_GROUP ? Math.ceil(data / BLOCKS_PER_GROUP / 340) + 1 : 0);
  } else if (inode.kind === 'symlink' && Buffer.byteLength(inode.target) >= 60) {
    blocks += 1;
  } else if (inode.kind === 'dir') {
    // Entries never straddle blocks, so every directory may waste most of its last block.
    blocks += 1;
  }
  if (inode.xattrs?.size) blocks += 1;
  return blocks;
}

// ---- mke2fs and debugfs ------------------------------------------------------------------------

/** A debugfs argument: ss_parse takes `"..."` with `""` for a literal quote. */
function quote(value: string): string {
  return `"${value.replaceAll('"', '""')}"`;
}

const TYPE_BITS: Record<Kind, number> = {
  file: 0o100000,
  dir: 0o040000,
  symlink: 0o120000,
  char: 0o020000,
  block: 0o060000,
  fifo: 0o010000,
};

/**
 * The debugfs commands that give every inode its metadata. Each directory's entries are addressed
 * relative to it after one `cd`: a full path costs a lookup in every ancestor, which made the
 * script four times slower on a Debian image.
 */
async function writeScript(tree: LayerTree, plan: Plan, work: string): Promise<string> {
  const lines: string[] = [];
  // mke2fs always makes /lost+found; an image that does not have one should not grow one.
  // rmdir must get a bare name: given `/lost+found` it unlinks from the wrong directory.
  if (!tree.root.children!.has('lost+found')) lines.push('cd /', 'rmdir lost+found');
  const specialNames = new Map<Inode, number>();
  let cwd = '/';
  /** The name as an argument relative to its directory, changing to that directory first. */
  const at = (abs: string): string => {
    if (abs === '/') return '/';
    const cut = abs.lastIndexOf('/');
    const dir = cut === 0 ? '/' : abs.slice(0, cut);
    if (cwd !== dir) lines.push(`cd ${quote(dir)}`);
    cwd = dir;
    const name = abs.slice(cut + 1);
    // `<12>` would name inode 12 and `-x` an option of ea_set; `./` keeps them plain names.
    return quote(name.startsWith('<') || name.startsWith('-') ? `./${name}` : name);
  };
  let xattrFiles = 0;
  const xattrDir = path.join(work, 'xattrs');
  const writes: Promise<void>[] = [];
  for (const { path: abs, node } of plan.entries) {
    const inode = node.inode;
    const special = inode.kind === 'char' || inode.kind === 'block' || inode.kind === 'fifo';
    const first = plan.primary.get(inode)!;
    if (first !== abs && inode.kind !== 'symlink') {
      if (special) {
        // debugfs's ln does not count links; links_count is set once all are made.
        const name = at(abs);
        lines.push(`ln ${quote(first)} ${name}`);
        specialNames.set(inode, (specialNames.get(inode) ?? 1) + 1);
      }
      continue;
    }
    const p = at(abs);
    if (special) {
      // mknod makes its argument one entry of the current directory, slashes and all; `at` changed to it.
      const device = inode.kind === 'fifo' ? 'p' : `${inode.kind === 'char' ? 'c' : 'b'} ${inode.major} ${inode.minor}`;
      lines.push(`mknod ${p} ${device}`);
    }
    // The kernel gives every symlink 0777 and ignores its mode; so did the staging tree.
    if (inode.kind !== 'symlink') lines.push(`sif ${p} mode 0${(TYPE_BITS[inode.kind] | inode.perm).toString(8)}`);
    lines.push(`sif ${p} uid ${inode.uid}`, `sif ${p} gid ${inode.gid}`);
    // crtime needs nothing: e2fsprogs stamps new inodes with the pinned clock (see `run`).
    for (const field of ['mtime', 'atime', 'ctime']) lines.push(`sif ${p} ${field} @${inode.mtime}`);
    for (const [name, value] of inode.xattrs ?? []) {
      const file = path.join(xattrDir, String(xattrFiles++));
      if (xattrFiles === 1) await fs.mkdir(xattrDir, { mode: 0o700 });
      writes.push(fs.writeFile(file, value, { mode: 0o600 }));
      lines.push(`ea_set -f ${quote(file)} ${p} ${quote(name)}`);
    }
  }
  for (const [inode, count] of specialNames) lines.push(`sif ${quote(plan.primary.get(inode)!)} links_count ${count}`);
  await Promise.all(writes);
  const script = path.join(work, 'debugfs.script');
  await fs.writeFile(script, lines.join('\n') + '\n', { mode: 0o600 });
  return script;
}

/** A filesystem just big enough: the estimate from the tree, grown and retried if mke2fs runs out. */
async function makeFilesystem(file: string, staging: string, plan: Plan, seed: Buffer, signal: AbortSignal | undefined): Promise<void> {
  // Inodes for every name plus the reserved first eleven, lost+found and special files debugfs adds.
  const inodes = plan.inodes + 32;
  let blocks = estimateBlocks(plan.blocks, inodes);
  const uuid = uuidFrom(seed);
  for (let attempt = 0; ; attempt++) {
    await fs.rm(file, { force: true });
    const fh = await fs.open(file, 'wx', 0o644);
    await fh.truncate(blocks * BLOCK_BYTES);
    await fh.close();
    const args = [
      '-q',
      '-F',
      '-t',
      'ext4',
      '-b',
      String(BLOCK_BYTES),
      '-I',
      String(INODE_BYTES),
      '-N',
      String(inodes),
      '-m',
      '0',
      '-O',
      '^has_journal,^resize_inode',
      '-U',
      uuid,
      '-E',
      `hash_seed=${uuid},root_owner=0:0,no_copy_xattrs,lazy_itable_init=1,nodiscard`,
      '-d',
      staging,
      file,
    ];
    try {
      await run('mke2fs', args, plan.epoch, signal);
      return;
    } catch (err) {
      const full = /allocate|no free space|no space left|not enough space/i.test((err as Error).message);
      if (!full || attempt >= 3 || signal?.aborted) throw err;
      blocks = Math.ceil(blocks * 1.25) + 1024;
    }
  }
}

function estimateBlocks(contentBlocks: number, inodes: number): number {
  let blocks = Math.ceil(contentBlocks) + Math.ceil((inodes * INODE_BYTES) / BLOCK_BYTES) + 64;
  const groups = Math.ceil(blocks / BLOCKS_PER_GROUP);
  // Per group: two bitmaps; backups of the superblock and descriptors in groups 0, 1 and powers of 3, 5 and 7.
  const descriptorBlocks = Math.ceil((groups * 64) / BLOCK_BYTES);
  let backups = 0;
  for (const base of [3, 5, 7]) for (let g = base; g < groups; g *= base) backups++;
  blocks += groups * 2 + (Math.min(groups, 2) + backups) * (1 + descriptorBlocks);
  return Math.ceil(blocks * 1.02) + 256;
}

function uuidFrom(seed: Buffer): string {
  const b = Buffer.from(seed.subarray(0, 16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

async function runDebugfs(file: string, script: string, epoch: number, signal: AbortSignal | undefined): Promise<void> {
  const { stderr } = await run('debugfs', ['-w', '-f', script, file], epoch, signal);
  // debugfs reports a failed command on stderr and carries on with exit status 0.
  const problems = stderr
    .split('\n')
    .filter((l) => l.trim() !== '' && !/^debugfs \d/.test(l))
    .slice(0, 5);
  if (problems.length > 0) throw new AegisError('INTERNAL', `debugfs could not apply the image's metadata: ${problems.join('; ')}`);
}

const MAX_STDERR_BYTES = 64 * 1024;

/** Runs an e2fsprogs tool with its clock pinned to `epoch`, so the same layers give the same bytes. */
async function run(command: string, args: string[], epoch: number, signal: AbortSignal | undefined): Promise<{ stderr: string }> {
  // Ordinary users often lack /usr/sbin on PATH, which is where Debian keeps e2fsprogs.
  const env = { ...process.env, PATH: `${process.env['PATH'] ?? ''}:/usr/sbin:/sbin`, E2FSPROGS_FAKE_TIME: String(epoch), LC_ALL: 'C' };
  const child = spawn(command, args, { env, stdio: ['ignore', 'ignore', 'pipe'], ...(signal ? { signal } : {}) });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => {
    if (stderr.length < MAX_STDERR_BYTES) stderr += chunk;
  });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', resolve);
  }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new AegisError('UNAVAILABLE', `${command} is not installed; install e2fsprogs`);
    throw err;
  });
  if (code !== 0) throw new AegisError('INTERNAL', `${command} failed (exit ${code}): ${stderr.trim().slice(0, 2000)}`);
  return { stderr };
}

function checkAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw new AegisError('CANCELLED', 'building the image filesystem was cancelled');
}
