/**
 * The guest side of the files API and `aegis cp` (contract: @aegis/protocol files.ts). aegis-init
 * splices each data-channel connection to "port 0" onto FILES_SOCKET; each one carries one
 * operation. Paths are the instance's: inside the image root when it has one, where symlinks
 * resolve as the workload would see them (an absolute link stays inside that root).
 */
import { constants as fsConstants, promises as fs, type Stats } from 'node:fs';
import { randomBytes } from 'node:crypto';
import net from 'node:net';
import path from 'node:path';
import { spawn, type StdioOptions } from 'node:child_process';
import {
  AegisError,
  MAX_LIST_ENTRIES,
  type ErrorCode,
  parseFileRequest,
  parseJsonLine,
  readHeaderLine,
  type FileReply,
  type FileRequest,
  type FileStat,
} from '@aegis/protocol';
import { IMAGE_ROOT, resolveInRoot } from './image.js';

export const FILES_SOCKET = '/run/aegis-files.sock';
const INIT = '/aegis/init';

/**
 * Runs cat or tar (`aegis-init blocking -- …`), or aegis-init's own sendfile copy, on the
 * connection's socket itself: under emulation every byte Node touches costs ~10x what C costs,
 * so bulk data never passes through this process. Their stderr (bounded) is the error's message.
 */
function helper(argv: string[], stdio: StdioOptions): Promise<void> {
  return new Promise((resolve, reject) => {
    const child = spawn(INIT, argv[0] === 'sendfile' ? argv : ['blocking', '--', ...argv], { stdio });
    let err = '';
    child.stderr?.on('data', (c: Buffer) => {
      if (err.length < 4096) err += c.toString('utf8');
    });
    child.once('error', (e) => reject(new AegisError('INTERNAL', `${argv[0] ?? ''}: ${e.message}`)));
    child.once('close', (code) => {
      if (code === 0) return resolve();
      const msg = err.trim().split('\n').slice(-3).join('; ') || `${argv[0] ?? ''} exited with ${code ?? 'a signal'}`;
      reject(new AegisError(/No space left/.test(msg) ? 'RESOURCE_EXHAUSTED' : 'INVALID_ARGUMENT', msg.slice(0, 1000)));
    });
  });
}

function statOf(name: string, st: Stats, linkTarget?: string): FileStat {
  const type = st.isFile() ? 'file' : st.isDirectory() ? 'directory' : st.isSymbolicLink() ? 'symlink' : 'other';
  return {
    name,
    type,
    size: st.size,
    mode: st.mode & 0o7777,
    uid: st.uid,
    gid: st.gid,
    mtimeMs: Math.round(st.mtimeMs),
    ...(linkTarget !== undefined ? { linkTarget } : {}),
  };
}

/** An fs error as the user's path and a plain phrase (never the harness's own path: an image root is /aegis/image). */
function codeOf(err: unknown, guestPath: string): AegisError {
  if (err instanceof AegisError) return err;
  const e = err as NodeJS.ErrnoException;
  const say = (code: ErrorCode, what: string): AegisError => new AegisError(code, `${guestPath}: ${what}`);
  switch (e.code) {
    case 'ENOENT':
      return say('NOT_FOUND', 'no such file or directory');
    case 'EEXIST':
      return say('ALREADY_EXISTS', 'already exists');
    case 'ENOTEMPTY':
      return say('FAILED_PRECONDITION', 'directory not empty (remove it with recursive)');
    case 'ENOTDIR':
      return say('INVALID_ARGUMENT', 'a component of the path is not a directory');
    case 'EISDIR':
      return say('INVALID_ARGUMENT', 'is a directory');
    case 'ELOOP':
      return say('INVALID_ARGUMENT', 'too many levels of symbolic links');
    case 'ENOSPC':
    case 'EDQUOT':
      return say('RESOURCE_EXHAUSTED', 'no space left on the device');
    case 'EACCES':
    case 'EPERM':
      return say('FAILED_PRECONDITION', 'permission denied');
    case 'EROFS':
      return say('FAILED_PRECONDITION', 'read-only file system');
    default:
      return say('INTERNAL', e.code ?? e.message);
  }
}

class Paths {
  constructor(private readonly root: string) {}

  /** `p` with every symlink followed inside the root; NOT_FOUND when a component is missing. */
  async resolve(p: string): Promise<string> {
    const real = await resolveInRoot(this.root, p);
    if (!real) throw new AegisError('NOT_FOUND', `${p}: no such file or directory`);
    return real;
  }

  /** `p`'s directory resolved, its last component not followed (for lstat, create, remove). */
  async parentAnd(p: string): Promise<{ dir: string; base: string; full: string }> {
    const norm = path.posix.resolve('/', p);
    if (norm === '/') return { dir: this.root, base: '', full: this.root };
    const dir = await this.resolve(path.posix.dirname(norm));
    const base = path.posix.basename(norm);
    return { dir, base, full: path.join(dir, base) };
  }
}

async function serve(conn: net.Socket): Promise<void> {
  let req: FileRequest;
  try {
    req = parseFileRequest(parseJsonLine(await readHeaderLine(conn)));
  } catch (err) {
    return reply(conn, codeOf(err, '(request)'), true);
  }
  const paths = new Paths(req.image ? IMAGE_ROOT : '/');
  // Once a success line went out, data follows it: an error then can only cut the stream short.
  let started = false;
  const begin = (r: FileReply): Promise<void> => {
    started = !('ready' in r);
    // Flushed before a helper writes to the same socket, so the line comes first.
    return new Promise((resolve, reject) => conn.write(JSON.stringify(r) + '\n', (err) => (err ? reject(err) : resolve())));
  };
  try {
    switch (req.op) {
      case 'stat': {
        const { full, base } = await paths.parentAnd(req.path);
        const st = await fs.lstat(full);
        const target = st.isSymbolicLink() ? await fs.readlink(full) : undefined;
        return reply(conn, { ok: true, stat: statOf(base || '/', st, target) }, true);
      }
      case 'list': {
        const dir = await paths.resolve(req.path);
        const names = (await fs.readdir(dir)).sort().slice(0, MAX_LIST_ENTRIES);
        const lines: string[] = [];
        for (const name of names) {
          const st = await fs.lstat(path.join(dir, name)).catch(() => undefined);
          if (!st) continue; // gone meanwhile
          const target = st.isSymbolicLink() ? await fs.readlink(path.join(dir, name)).catch(() => '') : undefined;
          lines.push(JSON.stringify(statOf(name, st, target)));
        }
        await begin({ ok: true, entries: lines.length });
        for (const l of lines) if (!conn.write(l + '\n')) await new Promise((r) => conn.once('drain', r));
        conn.end();
        return;
      }
      case 'read': {
        const file = await paths.resolve(req.path);
        const fh = await fs.open(file, fsConstants.O_RDONLY);
        try {
          const st = await fh.stat();
          if (!st.isFile())
            throw new AegisError('INVALID_ARGUMENT', `${req.path} is ${st.isDirectory() ? 'a directory' : 'not a regular file'}`);
          await begin({ ok: true, stat: statOf(path.basename(req.path), st) });
          await helper(['sendfile'], [fh.fd, conn, 'pipe']);
        } finally {
          await fh.close();
        }
        conn.end();
        return;
      }
      case 'write': {
        const { full, base, dir } = await paths.parentAnd(req.path);
        if (!base) throw new AegisError('INVALID_ARGUMENT', 'cannot write to /');
        const existing = await fs.lstat(full).catch(() => undefined);
        if (existing?.isDirectory()) throw new AegisError('INVALID_ARGUMENT', `${req.path} is a directory`);
        // Into a new file beside it, renamed over the name once complete: a transfer cut short
        // leaves the old file (and a symlink at the name is replaced, never written through).
        const temp = path.join(dir, `.${base.slice(0, 200)}.aegis-${randomBytes(4).toString('hex')}`);
        const fh = await fs.open(temp, fsConstants.O_WRONLY | fsConstants.O_CREAT | fsConstants.O_EXCL | fsConstants.O_NOFOLLOW, 0o600);
        try {
          await begin({ ok: true, ready: true });
          await helper(['cat'], [conn, fh.fd, 'pipe']);
          const written = (await fh.stat()).size;
          if (req.size !== undefined && written !== req.size) {
            throw new AegisError('INVALID_ARGUMENT', `the upload ended after ${written} of ${req.size} bytes; ${req.path} is unchanged`);
          }
          await fh.chmod(req.mode ?? (existing?.isFile() ? existing.mode & 0o7777 : 0o644));
          await fh.close();
          await fs.rename(temp, full);
        } catch (err) {
          await fh.close().catch(() => undefined);
          await fs.rm(temp, { force: true });
          throw err;
        }
        return reply(conn, { ok: true, stat: statOf(base, await fs.lstat(full)) }, true);
      }
      case 'mkdir': {
        const norm = path.posix.resolve('/', req.path);
        if (req.parents) {
          // Each component is created (or found a directory) inside the root, never through a link out.
          let at = '/';
          for (const part of norm.split('/').filter(Boolean)) {
            at = path.posix.join(at, part);
            const { full } = await paths.parentAnd(at);
            const st = await fs.stat(full).catch(() => undefined);
            if (!st) await fs.mkdir(full, { mode: req.mode ?? 0o755 });
            else if (!st.isDirectory()) throw new AegisError('INVALID_ARGUMENT', `${at} exists and is not a directory`);
          }
        } else {
          const { full } = await paths.parentAnd(norm);
          await fs.mkdir(full, { mode: req.mode ?? 0o755 });
        }
        const { full, base } = await paths.parentAnd(norm);
        return reply(conn, { ok: true, stat: statOf(base || '/', await fs.lstat(full)) }, true);
      }
      case 'remove': {
        const { full, base } = await paths.parentAnd(req.path);
        if (!base) throw new AegisError('INVALID_ARGUMENT', 'cannot remove /');
        const st = await fs.lstat(full);
        if (st.isDirectory() && !req.recursive) await fs.rmdir(full);
        else await fs.rm(full, { recursive: req.recursive, force: false });
        return reply(conn, { ok: true }, true);
      }
      case 'tarOut': {
        const { dir, full, base } = await paths.parentAnd(req.path);
        const st = await fs.lstat(full);
        await begin({ ok: true, stat: statOf(base || '/', st) });
        await helper(['tar', '-C', dir, '-cf', '-', '--numeric-owner', '--', base || '.'], ['ignore', conn, 'pipe']);
        conn.end();
        return;
      }
      case 'tarIn': {
        const dir = await paths.resolve(req.path);
        if (!(await fs.stat(dir)).isDirectory()) throw new AegisError('INVALID_ARGUMENT', `${req.path} is not a directory`);
        await begin({ ok: true, ready: true });
        // GNU tar refuses `..` members and strips leading slashes; owners are root's unless asked (docker cp -a).
        const owner = req.keepOwner ? ['--same-owner', '--numeric-owner'] : ['--no-same-owner'];
        await helper(['tar', '-C', dir, '-xpf', '-', ...owner], [conn, 'ignore', 'pipe']);
        return reply(conn, { ok: true, stat: statOf(path.basename(req.path), await fs.stat(dir)) }, true);
      }
    }
  } catch (err) {
    // Before any data went out, the error is the reply; after, the connection just ends early.
    if (!started && conn.writable) reply(conn, codeOf(err, req.path), true);
    else conn.destroy();
  }
}

function reply(conn: net.Socket, r: FileReply | AegisError, end: boolean): void {
  const line: FileReply = r instanceof AegisError ? { ok: false, code: r.code, message: r.message.slice(0, 1000) } : r;
  if (end) conn.end(JSON.stringify(line) + '\n');
  else conn.write(JSON.stringify(line) + '\n');
}

/** Listens on FILES_SOCKET (root only: the workload runs as root too, but nothing else reaches it over a network). */
export async function startFileService(): Promise<net.Server> {
  await fs.rm(FILES_SOCKET, { force: true });
  // Half-open: the host ends its side after the request (and its bytes); the reply still goes out.
  const server = net.createServer({ allowHalfOpen: true }, (conn) => {
    conn.on('error', () => conn.destroy());
    void serve(conn).catch(() => conn.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(FILES_SOCKET, () => resolve());
  });
  await fs.chmod(FILES_SOCKET, 0o600);
  return server;
}
