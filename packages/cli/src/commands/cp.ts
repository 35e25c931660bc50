/**
 * `aegis cp`, as `docker cp`: `SRC INSTANCE:DEST` or `INSTANCE:SRC DEST`; `-` on the host side
 * is a tar on stdin or stdout. Where the copy lands follows Docker's rules: into an existing
 * directory under the source's name, else to the destination's name (whose parent must exist);
 * `SRC/.` copies a directory's contents. Bytes travel as a tar stream through the daemon's
 * archive endpoints; what comes out of the guest is unpacked by @aegis/archive, which keeps
 * every entry inside the destination.
 */
import { createReadStream, promises as fs, writeSync, type Stats } from 'node:fs';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { Command } from 'commander';
import { AegisError, isAegisError, type FileStat } from '@aegis/client';
import { client, fail, formatBytes } from '../util.js';

interface Target {
  /** Absent: a host path. */
  instance?: string;
  path: string;
}

/** `name:path` is in an instance unless it looks like a host path (`./a:b`, `/x:y`), as Docker reads it. */
function parseTarget(arg: string): Target {
  if (arg === '-' || arg.startsWith('/') || arg.startsWith('.')) return { path: arg };
  const colon = arg.indexOf(':');
  if (colon <= 0) return { path: arg };
  const p = arg.slice(colon + 1);
  if (!p.startsWith('/')) throw new AegisError('INVALID_ARGUMENT', `"${arg}": the path in an instance must be absolute`);
  return { instance: arg.slice(0, colon), path: p };
}

/** `dir/.`: the directory's contents, not the directory. */
const contentsOf = (p: string): boolean => p === '.' || p.endsWith('/.');

async function guestStat(ref: string, p: string): Promise<FileStat | undefined> {
  try {
    return await client().statFile(ref, p);
  } catch (err) {
    if (isAegisError(err, 'NOT_FOUND')) return undefined;
    throw err;
  }
}

function writeAll(fd: number, chunk: Buffer): void {
  for (let off = 0; off < chunk.length;) off += writeSync(fd, chunk, off);
}

async function hostStat(p: string): Promise<Stats | undefined> {
  return fs.stat(p).catch(() => undefined);
}

/** Host → guest. Returns the bytes sent (the files' sizes). */
async function copyIn(src: string, dest: Target & { instance: string }, keepOwner: boolean): Promise<number> {
  const api = client();
  const { packPath } = await import('@aegis/archive');
  if (src === '-') {
    const st = await guestStat(dest.instance, dest.path);
    if (st?.type !== 'directory')
      throw new AegisError('INVALID_ARGUMENT', `${dest.instance}:${dest.path} must be a directory to unpack a tar from stdin into`);
    await api.putArchive(dest.instance, dest.path, process.stdin, { keepOwner });
    return 0;
  }
  const local = await fs.lstat(src).catch(() => undefined);
  if (!local) throw new AegisError('NOT_FOUND', `no such file or directory: ${src}`);
  const target = await guestStat(dest.instance, dest.path);
  let dir: string;
  let name: string;
  if (target?.type === 'directory') {
    if (local.isDirectory() && contentsOf(src)) [dir, name] = [dest.path, '.'];
    else [dir, name] = [dest.path, path.basename(path.resolve(src))];
  } else {
    if (target && local.isDirectory())
      throw new AegisError('INVALID_ARGUMENT', `cannot copy a directory onto the file ${dest.instance}:${dest.path}`);
    if (!target && dest.path.endsWith('/')) throw new AegisError('NOT_FOUND', `no such directory: ${dest.instance}:${dest.path}`);
    [dir, name] = [path.posix.dirname(dest.path), path.posix.basename(dest.path)];
    const parent = await guestStat(dest.instance, dir);
    if (parent?.type !== 'directory') throw new AegisError('NOT_FOUND', `no such directory: ${dest.instance}:${dir}`);
  }
  if (local.isFile() && name !== '.' && !keepOwner) {
    // One regular file: its bytes as they are (no tar to build or parse), mode kept, length checked.
    const guestPath = path.posix.join(dir, name);
    await api.writeFile(dest.instance, guestPath, createReadStream(src), { mode: local.mode & 0o7777, length: local.size });
    return local.size;
  }
  await api.putArchive(dest.instance, dir, packPath(path.resolve(src), name), { keepOwner });
  return local.isDirectory() ? 0 : local.size;
}

/** Guest → host. Returns the bytes unpacked. */
async function copyOut(src: Target & { instance: string }, dest: string): Promise<number> {
  if (dest !== '-') {
    const direct = await copyFileOut(src, dest);
    if (direct !== undefined) return direct;
  }
  const { stat, tar } = await client().getArchive(src.instance, src.path);
  if (dest === '-') {
    await pipeline(tar, process.stdout);
    return 0;
  }
  const { extractTar } = await import('@aegis/archive');
  const target = await hostStat(dest);
  let dir: string;
  let topName: string;
  if (target?.isDirectory()) {
    if (stat.type === 'directory' && contentsOf(src.path)) [dir, topName] = [dest, ''];
    else [dir, topName] = [dest, stat.name === '/' ? 'root' : stat.name];
  } else {
    if (target && stat.type === 'directory') throw new AegisError('INVALID_ARGUMENT', `cannot copy a directory onto the file ${dest}`);
    if (!target && dest.endsWith('/')) throw new AegisError('NOT_FOUND', `no such directory: ${dest}`);
    [dir, topName] = [path.dirname(path.resolve(dest)), path.basename(path.resolve(dest))];
    if (!(await hostStat(dir))?.isDirectory()) throw new AegisError('NOT_FOUND', `no such directory: ${dir}`);
  }
  const r = await extractTar(tar, dir, { topName });
  for (const s of r.skipped) process.stderr.write(`aegis: skipped ${s}\n`);
  return r.bytes;
}

/**
 * One regular file out: its bytes straight into the destination file (no tar), written to a
 * temporary name beside it and renamed once complete. Undefined when the source is not a plain
 * file, or the destination is not a plain file name: the tar path handles those.
 */
async function copyFileOut(src: Target & { instance: string }, dest: string): Promise<number | undefined> {
  // The read is asked for beside the stat, not after it: one round trip to the guest less. It
  // waits, pushing back, until the stat says a plain file and the destination is settled; it
  // is dropped otherwise (a directory fails it anyway; a symlink goes by tar, as docker cp does).
  const reading = client()
    .readFile(src.instance, src.path)
    .catch((err: unknown) => (err instanceof Error ? err : new Error(String(err))));
  const drop = async (): Promise<void> => {
    const r = await reading;
    if (!(r instanceof Error)) r.data.destroy();
  };
  let file: string;
  let stat: FileStat | undefined;
  try {
    stat = await guestStat(src.instance, src.path);
    if (stat?.type !== 'file') {
      await drop();
      return undefined;
    }
    const target = await hostStat(dest);
    if (dest.endsWith('/') && !target) throw new AegisError('NOT_FOUND', `no such directory: ${dest}`);
    file = target?.isDirectory() ? path.join(dest, stat.name) : path.resolve(dest);
    if (!(await hostStat(path.dirname(file)))?.isDirectory()) throw new AegisError('NOT_FOUND', `no such directory: ${path.dirname(file)}`);
    const existing = await fs.lstat(file).catch(() => undefined);
    if (existing && !existing.isFile()) {
      await drop(); // a directory or a link there: tar's rules
      return undefined;
    }
  } catch (err) {
    await drop();
    throw err;
  }
  const r = await reading;
  if (r instanceof Error) throw r;
  const { data, size } = r;
  const temp = path.join(path.dirname(file), `.${path.basename(file).slice(0, 200)}.aegis-cp-${process.pid}`);
  try {
    // O_EXCL: nothing already at the temporary name is written through. Written synchronously
    // as each chunk arrives: a write into the page cache takes microseconds, and a write stream's
    // round trips through the thread pool paused the socket often enough to cost ~20% of the rate.
    const fd = await fs.open(temp, 'wx', stat.mode & 0o777);
    try {
      await new Promise<void>((resolve, reject) => {
        data.on('data', (chunk: Buffer) => writeAll(fd.fd, chunk));
        data.once('end', resolve);
        data.once('error', reject);
        data.once('close', () => (data.readableEnded ? resolve() : reject(new AegisError('UNAVAILABLE', 'the copy was cut short'))));
      });
    } finally {
      await fd.close();
    }
    const got = (await fs.stat(temp)).size;
    if (size >= 0 && got !== size)
      throw new AegisError('UNAVAILABLE', `the copy ended after ${got} of ${size} bytes; ${file} is unchanged`);
    await fs.chmod(temp, stat.mode & 0o777);
    await fs.utimes(temp, new Date(stat.mtimeMs), new Date(stat.mtimeMs));
    await fs.rename(temp, file);
    return got;
  } catch (err) {
    data.destroy();
    await fs.rm(temp, { force: true });
    throw err;
  }
}

export function cpCommand(): Command {
  return new Command('cp')
    .description('copy files and directories between the host and an instance, as docker cp (- is a tar on stdin/stdout)')
    .argument('<src>', 'HOST_PATH, INSTANCE:PATH, or -')
    .argument('<dest>', 'HOST_PATH, INSTANCE:PATH, or -')
    .option('-a, --archive', "keep the files' owners (uid/gid) when copying into an instance")
    .option('-q, --quiet', 'no summary line')
    .action(async (srcArg: string, destArg: string, o: { archive?: boolean; quiet?: boolean }) => {
      try {
        const src = parseTarget(srcArg);
        const dest = parseTarget(destArg);
        let bytes: number;
        if (src.instance !== undefined && dest.instance === undefined) bytes = await copyOut({ ...src, instance: src.instance }, dest.path);
        else if (dest.instance !== undefined && src.instance === undefined)
          bytes = await copyIn(src.path, { ...dest, instance: dest.instance }, o.archive === true);
        else
          throw new AegisError('INVALID_ARGUMENT', 'copy between the host and an instance: exactly one of SRC and DEST is INSTANCE:PATH');
        if (!o.quiet && process.stderr.isTTY && srcArg !== '-' && destArg !== '-') {
          process.stderr.write(`Successfully copied ${formatBytes(bytes)} to ${destArg}\n`);
        }
      } catch (err) {
        fail(err);
      }
    });
}
