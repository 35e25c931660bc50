/**
 * The tar streams `aegis cp` moves, at both ends: `packPath` writes one, `extractTar` unpacks
 * one into a directory without letting it reach outside. The extracting side never trusts the
 * stream: the host extracts what a guest made, and a guest could make anything.
 *
 * Extraction rules (what docker cp does, minus what would be an escape):
 * - names are relative: a leading `/` is dropped; `..` anywhere refuses the entry;
 * - nothing is written through a symlink: every directory on an entry's way must be a real
 *   directory (an entry named `a/x` after a symlink `a -> /etc` is refused), and a file or link
 *   that meets a symlink at its own name replaces the symlink, never follows it;
 * - hard links must name an earlier path inside the destination, reached the same way;
 * - devices, FIFOs and sockets are skipped; setuid, setgid and sticky bits are dropped unless
 *   `keepSpecialBits` (the guest side, which is root there anyway); owners are set only with
 *   `keepOwner` (docker cp -a).
 */
import { constants as fsConstants, createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import { Readable } from 'node:stream';
import * as tar from 'tar-stream';
import { AegisError, type ErrorCode } from '@aegis/protocol';

export interface ExtractOptions {
  keepOwner?: boolean;
  keepSpecialBits?: boolean;
  /**
   * Renames the archive's top entry (`docker cp` to a new name): every entry's first
   * component becomes this one; `''` drops it, so what was inside lands in `dest` itself.
   */
  topName?: string;
}

export interface ExtractResult {
  entries: number;
  bytes: number;
  /** Entries left out, with why (devices, `..` names, writes through symlinks). */
  skipped: string[];
}

const MAX_SKIPPED_REPORTED = 100;

/** Packs `src` (a file, directory or symlink; not followed) as one top entry named `name`. */
export function packPath(src: string, name: string): Readable {
  const pack = tar.pack();
  // A node Readable for callers (HTTP bodies, sockets, pipeline()): tar-stream's is a streamx one.
  const out = Readable.from(pack as AsyncIterable<Buffer>);
  void (async () => {
    try {
      await addEntry(pack, src, name);
      pack.finalize();
    } catch (err) {
      pack.destroy(err as Error);
    }
  })();
  return out;
}

async function addEntry(pack: tar.Pack, file: string, name: string): Promise<void> {
  const st = await fs.lstat(file);
  const common = { name, mode: st.mode & 0o7777, uid: st.uid, gid: st.gid, mtime: st.mtime };
  if (st.isDirectory()) {
    await new Promise<void>((resolve, reject) => pack.entry({ ...common, type: 'directory' }, (err) => (err ? reject(err) : resolve())));
    for (const child of (await fs.readdir(file)).sort()) await addEntry(pack, path.join(file, child), `${name}/${child}`);
  } else if (st.isSymbolicLink()) {
    const linkname = await fs.readlink(file);
    await new Promise<void>((resolve, reject) =>
      pack.entry({ ...common, type: 'symlink', linkname }, (err) => (err ? reject(err) : resolve())),
    );
  } else if (st.isFile()) {
    await new Promise<void>((resolve, reject) => {
      const entry = pack.entry({ ...common, type: 'file', size: st.size }, (err) => (err ? reject(err) : resolve()));
      // A file that changes size while packed would break the archive: exactly `size` bytes go in.
      if (st.size === 0) entry.end(Buffer.alloc(0));
      else feed(createReadStream(file, { start: 0, end: st.size - 1 }), entry).catch(reject);
    });
  }
  // Devices, FIFOs and sockets: nothing a copy can carry.
}

/** Writes `source` into a tar-stream (streamx) writable by hand: node's pipeline() does not drive those reliably. */
async function feed(source: AsyncIterable<Buffer>, sink: tar.Extract | ReturnType<tar.Pack['entry']>): Promise<void> {
  for await (const chunk of source) {
    if (sink.destroyed) return;
    if (!sink.write(chunk)) await new Promise<void>((r) => sink.once('drain', () => r()));
  }
  sink.end(Buffer.alloc(0));
}

/** Splits an entry name into safe components, or says why it is refused. */
function components(name: string): string[] | string {
  const parts = name.split('/').filter((p) => p !== '' && p !== '.');
  if (parts.includes('..')) return 'a ".." in its name';
  if (name.length > 4096) return 'a name over 4096 characters';
  return parts;
}

/** The directory `parts` names under `dest`, made real directories as needed; never through a symlink. */
async function safeDir(dest: string, parts: string[]): Promise<string | undefined> {
  let dir = dest;
  for (const p of parts) {
    dir = path.join(dir, p);
    const st = await fs.lstat(dir).catch(() => undefined);
    if (!st) await fs.mkdir(dir, { mode: 0o755 });
    else if (!st.isDirectory()) return undefined;
  }
  return dir;
}

/** Removes whatever is at `target` unless it is a directory (a file entry then fails, as tar does). */
async function clear(target: string): Promise<void> {
  const st = await fs.lstat(target).catch(() => undefined);
  if (st && !st.isDirectory()) await fs.unlink(target);
}

/** Extracts `stream` into the existing directory `dest`. */
export async function extractTar(stream: Readable, dest: string, options: ExtractOptions = {}): Promise<ExtractResult> {
  const result: ExtractResult = { entries: 0, bytes: 0, skipped: [] };
  const skip = (name: string, why: string): void => {
    if (result.skipped.length < MAX_SKIPPED_REPORTED) result.skipped.push(`${name.slice(0, 256)}: ${why}`);
  };
  const extract = tar.extract();
  const dirTimes: [string, Date][] = [];
  // Not destroyed at its end: the caller may still answer on it (a socket, half-closed).
  feed(stream.iterator({ destroyOnReturn: false }) as AsyncIterable<Buffer>, extract).catch((err: unknown) =>
    extract.destroy(err as Error),
  );
  const x: Extraction = { dest, options, result, skip, dirTimes, created: [] };
  try {
    await extractEntries(extract, x);
  } catch (err) {
    // A copy that fails half-way leaves nothing it made (what it replaced is gone, as with docker cp).
    for (const p of x.created.reverse()) await fs.rm(p, { recursive: true, force: true }).catch(() => undefined);
    if (err instanceof AegisError) throw err;
    throw new AegisError('INVALID_ARGUMENT', `not a valid tar stream: ${(err as Error).message}`);
  }
  // Directory times last: creating their contents changed them.
  for (const [dir, t] of dirTimes.reverse()) await fs.utimes(dir, t, t).catch(() => undefined);
  return result;
}

/** One extraction's destination, options and what it has done so far. */
interface Extraction {
  dest: string;
  options: ExtractOptions;
  result: ExtractResult;
  skip: (name: string, why: string) => void;
  dirTimes: [string, Date][];
  /** What this extraction made (not what it replaced), in order: removed if it fails. */
  created: string[];
}

async function extractEntries(extract: tar.Extract, x: Extraction): Promise<void> {
  for await (const entry of extract) {
    try {
      await extractEntry(entry, x);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (err instanceof AegisError || code === undefined) throw err;
      const name = entry.header.name.slice(0, 256);
      throw new AegisError(HOST_ERRORS[code] ?? 'UNAVAILABLE', `cannot write ${name} here: ${code} (${(err as Error).message})`);
    }
  }
}

/** One entry as the extractor yields it. */
type TarEntry = tar.Extract extends AsyncIterable<infer E> ? E : never;

/** What a host error writing an entry means for the copy. */
const HOST_ERRORS: Record<string, ErrorCode> = {
  ENAMETOOLONG: 'INVALID_ARGUMENT',
  ENOSPC: 'RESOURCE_EXHAUSTED',
  EDQUOT: 'RESOURCE_EXHAUSTED',
  EACCES: 'FAILED_PRECONDITION',
  EPERM: 'FAILED_PRECONDITION',
  EROFS: 'FAILED_PRECONDITION',
};

async function extractEntry(entry: TarEntry, x: Extraction): Promise<void> {
  const { dest, options, result, skip, dirTimes, created } = x;
  const h = entry.header;
  let parts = components(h.name);
  if (typeof parts !== 'string' && options.topName !== undefined && parts.length > 0) {
    parts = options.topName === '' ? parts.slice(1) : [options.topName, ...parts.slice(1)];
    if (parts.length === 0 && h.type !== 'directory') parts = 'a top entry that is not a directory cannot be unpacked into one';
  }
  const drain = (): Promise<void> => new Promise<void>((r) => entry.resume().once('end', () => r()));
  if (typeof parts === 'string') {
    skip(h.name, parts);
    await drain();
    return;
  }
  const base = parts.at(-1);
  const parent = await safeDir(dest, parts.slice(0, -1));
  if (parent === undefined) {
    skip(h.name, 'its directory is not a directory (a symlink or a file)');
    await drain();
    return;
  }
  const target = base === undefined ? dest : path.join(parent, base);
  const mode = (h.mode ?? 0o644) & (options.keepSpecialBits ? 0o7777 : 0o777);
  switch (h.type) {
    case 'directory': {
      if (base === undefined) {
        await drain(); // the destination itself: it keeps its own mode and times
        break;
      }
      const st = await fs.lstat(target).catch(() => undefined);
      if (st && !st.isDirectory()) await fs.unlink(target);
      if (!st?.isDirectory()) {
        await fs.mkdir(target, { mode: 0o700 });
        created.push(target);
      }
      await fs.chmod(target, mode);
      if (h.mtime) dirTimes.push([target, h.mtime]);
      await drain();
      break;
    }
    case 'file':
    case 'contiguous-file': {
      if (base === undefined) {
        skip(h.name, 'a file where the destination directory is');
        await drain();
        return;
      }
      await clear(target);
      // O_NOFOLLOW|O_EXCL: whatever appeared at `target` since, the write does not go through it.
      const fh = await fs.open(target, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
      created.push(target);
      try {
        // Batched into writes of up to 1 MiB: one awaited write per tar chunk made extraction
        // the slowest step of `aegis cp` out. (A fs.WriteStream on the handle hung on end()
        // when fed from tar-stream's iterator.)
        let batch: Buffer[] = [];
        let batched = 0;
        for await (const chunk of entry as AsyncIterable<Buffer>) {
          batch.push(chunk);
          batched += chunk.length;
          if (batched >= 1 << 20) {
            await fh.write(Buffer.concat(batch, batched));
            batch = [];
            batched = 0;
          }
        }
        if (batched > 0) await fh.write(Buffer.concat(batch, batched));
        await fh.chmod(mode);
        if (options.keepOwner) await fh.chown(h.uid ?? 0, h.gid ?? 0);
        if (h.mtime) await fh.utimes(h.mtime, h.mtime);
      } finally {
        await fh.close();
      }
      result.bytes += h.size ?? 0;
      break;
    }
    case 'symlink': {
      if (base === undefined || !h.linkname) {
        skip(h.name, 'a symlink with no name or target');
        await drain();
        return;
      }
      await clear(target);
      await fs.symlink(h.linkname, target);
      created.push(target);
      if (options.keepOwner) await fs.lchown(target, h.uid ?? 0, h.gid ?? 0);
      await drain();
      break;
    }
    case 'link': {
      let from = components(h.linkname ?? '');
      if (typeof from !== 'string' && options.topName !== undefined && from.length > 0) {
        from = options.topName === '' ? from.slice(1) : [options.topName, ...from.slice(1)];
      }
      const fromDir = typeof from === 'string' || from.length === 0 ? undefined : await safeDir(dest, from.slice(0, -1));
      const fromPath = fromDir === undefined || typeof from === 'string' ? undefined : path.join(fromDir, from.at(-1) as string);
      const fromStat = fromPath === undefined ? undefined : await fs.lstat(fromPath).catch(() => undefined);
      if (base === undefined || !fromPath || !fromStat?.isFile()) {
        skip(h.name, 'a hard link to nothing extracted here before');
        await drain();
        return;
      }
      await clear(target);
      await fs.link(fromPath, target);
      created.push(target);
      await drain();
      break;
    }
    default:
      skip(h.name, `a ${h.type ?? 'special'} entry (devices, FIFOs and sockets are not copied)`);
      await drain();
      return;
  }
  result.entries++;
}
