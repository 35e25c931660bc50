/**
 * The union of an image's layers as an in-memory tree of metadata: each tar entry is checked
 * (everything in a layer is untrusted) and applied under the OCI whiteout and replacement rules,
 * so that only what survives the last layer is ever written to disk.
 */
import * as tar from 'tar-stream';
import { AegisError } from '@aegis/protocol';
import type { ContentStore } from './content-store.js';
import { MAX_NAME_BYTES, MAX_PATH_BYTES, asBytes, asCount, exhausted, imageLimits, type ImageLimits } from './limits.js';

export type Kind = 'file' | 'dir' | 'symlink' | 'char' | 'block' | 'fifo';

export interface Inode {
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

export interface TreeNode {
  inode: Inode;
  children: Map<string, TreeNode> | undefined;
  /** The layer that last wrote this name; whiteouts only hide what lower layers wrote. */
  layer: number;
}

const MAX_SYMLINK_HOPS = 40;
const WHITEOUT = '.wh.';
const OPAQUE = '.wh..wh..opq';
// Namespaces the guest kernel can store on ext4; anything else would become an unreadable attribute.
const XATTR_PREFIXES = ['user.', 'trusted.', 'security.', 'system.posix_acl_access', 'system.posix_acl_default'];

/**
 * What the tree has taken in, counted as entries stream so that an image over a limit is refused
 * before the tree holds more than the limit allows (see limits.ts).
 */
interface Intake {
  entries: number;
  layer: number;
  layerEntries: number;
  /** Where the current layer came from, for messages. */
  where: string;
  declaredBytes: number;
  metadataBytes: number;
}

export class LayerTree {
  readonly root: TreeNode = { inode: newInode('dir', 0o755), children: new Map(), layer: -1 };
  private readonly limits: Readonly<ImageLimits>;
  private readonly intake: Intake = { entries: 0, layer: -1, layerEntries: 0, where: '', declaredBytes: 0, metadataBytes: 0 };

  constructor(
    private readonly store: ContentStore,
    limits: Partial<ImageLimits> = {},
  ) {
    this.root.inode.names = 1;
    this.limits = imageLimits(limits);
  }

  /** Entries taken in over all layers so far. */
  get entries(): number {
    return this.intake.entries;
  }

  async apply(entry: TarEntry, layer: number, where: string): Promise<void> {
    const header = entry.header;
    const pax = (header.pax ?? undefined) as Record<string, string> | undefined;
    const name = header.name;
    const fail = (code: 'INVALID_ARGUMENT' | 'UNSUPPORTED', why: string): never => {
      throw new AegisError(code, `${where}: ${JSON.stringify(name.slice(0, 200))}: ${why}`);
    };
    if (this.intake.layer !== layer) Object.assign(this.intake, { layer, layerEntries: 0, where });
    this.count();
    if (pax) this.checkPax(pax, where);
    if (pax && Object.keys(pax).some((k) => k.startsWith('GNU.sparse.'))) fail('UNSUPPORTED', 'GNU sparse files are not supported');
    const parts = splitName(name, fail);
    const base = parts.at(-1);
    if (base !== undefined) this.keep(Buffer.byteLength(base));

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
    for (const [key, value] of inode.xattrs ?? []) this.keep(key.length + value.length);
    if (kind === 'symlink') {
      inode.target = h.linkname ?? '';
      if (!inode.target || inode.target.includes('\0')) fail('INVALID_ARGUMENT', 'symlink target is empty or holds a NUL');
      if (Buffer.byteLength(inode.target) > MAX_PATH_BYTES) fail('INVALID_ARGUMENT', 'symlink target is too long');
      this.keep(Buffer.byteLength(inode.target));
    } else if (kind === 'char' || kind === 'block') {
      inode.major = h.devmajor ?? 0;
      inode.minor = h.devminor ?? 0;
      // debugfs's mknod takes at most 16 bits of each; no device a container needs is larger.
      if (inode.major > 0xffff || inode.minor > 0xffff) fail('UNSUPPORTED', `device number ${inode.major}:${inode.minor} is too large`);
    }
    inode.size = kind === 'file' ? (h.size ?? 0) : 0;
    // Refused on the size the header declares, before any of it is written out.
    this.intake.declaredBytes += inode.size;
    if (this.intake.declaredBytes > this.limits.unpackedBytesPerImage) {
      throw exhausted('the image unpacked', asBytes(this.limits.unpackedBytesPerImage), 'per image');
    }
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
        // Parents a layer leaves out get what `mkdir -p` would give them; each costs what an entry does.
        this.count();
        this.keep(Buffer.byteLength(part));
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
      if (stack.length - 1 > this.limits.pathDepth) {
        fail('INVALID_ARGUMENT', `the path is more than ${this.limits.pathDepth} directories deep, the limit per path`);
      }
    }
    return { dir: stack.at(-1)!, depth: lengths.at(-1)! };
  }

  /** One more entry (or implied directory), refused past either limit. */
  private count(): void {
    const { intake, limits } = this;
    if (++intake.layerEntries > limits.entriesPerLayer) {
      throw exhausted(intake.where, asCount(limits.entriesPerLayer, 'entries'), 'per layer');
    }
    if (++intake.entries > limits.entriesPerImage) throw exhausted('the image', asCount(limits.entriesPerImage, 'entries'), 'per image');
  }

  /** Bytes of names, targets and attributes the tree is about to hold. */
  private keep(length: number): void {
    this.intake.metadataBytes += length;
    if (this.intake.metadataBytes > this.limits.metadataBytesPerImage) {
      throw exhausted(
        'the names, symlink targets and extended attributes of the image',
        asBytes(this.limits.metadataBytesPerImage),
        'per image',
      );
    }
  }

  private checkPax(pax: Record<string, string>, where: string): void {
    let length = 0;
    for (const [key, value] of Object.entries(pax)) length += key.length + value.length;
    if (length > this.limits.paxHeaderBytesPerEntry) {
      throw exhausted(`a PAX header in ${where}`, asBytes(this.limits.paxHeaderBytesPerEntry), 'per entry');
    }
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
