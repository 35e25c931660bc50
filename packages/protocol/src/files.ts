/**
 * The guest file service contract (`aegis cp` and the files API). The host opens a connection
 * to "port 0" on the data channel (spec/guest-rpc.md): aegis-init splices it to the harness's
 * file service. One operation per connection:
 *
 *   host → guest: one request line (JSON, FileRequest, at most MAX_FILE_HEADER bytes); for
 *                 `write` and `tarIn`, once the guest said `ready`, the bytes; then end (FIN)
 *   guest → host: one reply line (JSON, FileReply): for `write` and `tarIn` `{ok, ready}` and,
 *                 after the bytes, a second one with the result; for `read` the file's bytes
 *                 follow it, for `tarOut` a tar stream, for `list` one FileStat line per
 *                 entry; then end. (`ready` first: the bytes then go straight to cat or tar in
 *                 the guest, never through Node, which must not have read any of them.)
 *
 * Bytes are raw (the data channel's frames), never base64. Paths are absolute in the instance's
 * root (its image's, when it has one); symlinks resolve inside that root. Everything the guest
 * sends is parsed with the bounds below: the host trusts no reply.
 */
import type { ApiSchemas } from './api.js';
import { AegisError } from './errors.js';

export type FileRequest =
  | { op: 'stat'; path: string; image: boolean }
  | { op: 'list'; path: string; image: boolean }
  | { op: 'read'; path: string; image: boolean }
  /**
   * Replaces the file once all of it arrived (`size`, when given, is checked); `mode` default:
   * the old file's, else 0644. Parents must exist.
   */
  | { op: 'write'; path: string; image: boolean; mode?: number; size?: number }
  | { op: 'mkdir'; path: string; image: boolean; parents: boolean; mode?: number }
  | { op: 'remove'; path: string; image: boolean; recursive: boolean }
  /** A tar of `path` (not followed if a symlink) whose one top entry is its last component. */
  | { op: 'tarOut'; path: string; image: boolean }
  /** Extracts a tar into the directory `path` (files owned by root unless `keepOwner`, as docker cp). */
  | { op: 'tarIn'; path: string; image: boolean; keepOwner: boolean };

export type FileOp = FileRequest['op'];

/** What the guest reports of a file: the same FileStat the files API answers with (spec/openapi.json). */
export type FileStat = ApiSchemas['FileStat'];
export type FileType = FileStat['type'];

export type FileReply = { ok: true; ready?: true; stat?: FileStat; entries?: number } | { ok: false; code: string; message: string };

/** A request or reply line longer than this is refused (a path is at most 4096 bytes). */
export const MAX_FILE_HEADER = 64 * 1024;
/** Entries `list` sends at most; the reply's `entries` says how many follow. */
export const MAX_LIST_ENTRIES = 100_000;

type Obj = Record<string, unknown>;

function bad(what: string): never {
  throw new AegisError('INVALID_ARGUMENT', what);
}

function object(v: unknown, what: string, keys: readonly string[]): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) bad(`${what} must be an object`);
  for (const k of Object.keys(v)) if (!keys.includes(k)) bad(`${what}: unknown field ${JSON.stringify(k.slice(0, 64))}`);
  return v as Obj;
}

function int(v: unknown, what: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) bad(`${what} must be an integer from ${min} to ${max}`);
  return v;
}

function text(v: unknown, what: string, max: number): string {
  if (typeof v !== 'string' || v.length > max || v.includes('\0')) bad(`${what} must be a string of at most ${max} characters, no NUL`);
  return v;
}

function absolute(v: unknown): string {
  const p = text(v, 'path', 4096);
  if (!p.startsWith('/')) bad('path must be absolute');
  return p;
}

const TYPES: readonly FileType[] = ['file', 'directory', 'symlink', 'other'];

export function parseFileStat(v: unknown): FileStat {
  const o = object(v, 'file stat', ['name', 'type', 'size', 'mode', 'uid', 'gid', 'mtimeMs', 'linkTarget']);
  if (!TYPES.includes(o['type'] as FileType)) bad('type must be file, directory, symlink or other');
  const stat: FileStat = {
    name: text(o['name'], 'name', 4096),
    type: o['type'] as FileType,
    size: int(o['size'], 'size', 0, Number.MAX_SAFE_INTEGER),
    mode: int(o['mode'], 'mode', 0, 0o7777),
    uid: int(o['uid'], 'uid', 0, 0xffffffff),
    gid: int(o['gid'], 'gid', 0, 0xffffffff),
    mtimeMs: int(o['mtimeMs'], 'mtimeMs', -(2 ** 52), 2 ** 52),
  };
  if (o['linkTarget'] !== undefined) stat.linkTarget = text(o['linkTarget'], 'linkTarget', 4096);
  return stat;
}

/** The guest's reply line. An error reply keeps only a known code; its message is cut short. */
export function parseFileReply(v: unknown): FileReply {
  const o = object(v, 'file reply', ['ok', 'ready', 'stat', 'entries', 'code', 'message']);
  if (o['ok'] === true) {
    const r: FileReply = o['ready'] === true ? { ok: true, ready: true } : { ok: true };
    if (o['stat'] !== undefined) r.stat = parseFileStat(o['stat']);
    if (o['entries'] !== undefined) r.entries = int(o['entries'], 'entries', 0, MAX_LIST_ENTRIES);
    return r;
  }
  if (o['ok'] !== false) bad('ok must be true or false');
  return { ok: false, code: text(o['code'], 'code', 64), message: text(o['message'], 'message', 1024) };
}

/** What the harness accepts from the host. */
export function parseFileRequest(v: unknown): FileRequest {
  const o = object(v, 'file request', ['op', 'path', 'image', 'mode', 'size', 'parents', 'recursive', 'keepOwner']);
  const path = absolute(o['path']);
  const image = o['image'] === true;
  const mode = o['mode'] === undefined ? undefined : int(o['mode'], 'mode', 0, 0o7777);
  switch (o['op']) {
    case 'stat':
    case 'list':
    case 'read':
      return { op: o['op'], path, image };
    case 'write': {
      const size = o['size'] === undefined ? undefined : int(o['size'], 'size', 0, Number.MAX_SAFE_INTEGER);
      return { op: 'write', path, image, ...(mode === undefined ? {} : { mode }), ...(size === undefined ? {} : { size }) };
    }
    case 'mkdir':
      return { op: 'mkdir', path, image, parents: o['parents'] === true, ...(mode === undefined ? {} : { mode }) };
    case 'remove':
      return { op: 'remove', path, image, recursive: o['recursive'] === true };
    case 'tarOut':
      return { op: 'tarOut', path, image };
    case 'tarIn':
      return { op: 'tarIn', path, image, keepOwner: o['keepOwner'] === true };
    default:
      return bad('op must be stat, list, read, write, mkdir, remove, tarOut or tarIn');
  }
}

/**
 * Reads the first line of `stream` (at most MAX_FILE_HEADER bytes), leaving what follows it
 * unread for the caller; the stream is paused when this resolves.
 */
export function readHeaderLine(stream: NodeJS.ReadableStream & { unshift(chunk: Buffer): void }): Promise<string> {
  return new Promise((resolve, reject) => {
    let buf: Buffer = Buffer.alloc(0);
    const cleanup = (): void => {
      stream.off('data', onData);
      stream.off('end', onEnd);
      stream.off('close', onEnd);
      stream.off('error', onError);
      stream.pause();
    };
    const onData = (chunk: Buffer): void => {
      buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
      const nl = buf.indexOf(10);
      if (nl >= 0) {
        cleanup();
        const rest = buf.subarray(nl + 1);
        if (rest.length > 0) stream.unshift(rest);
        resolve(buf.subarray(0, nl).toString('utf8'));
      } else if (buf.length > MAX_FILE_HEADER) {
        cleanup();
        reject(new AegisError('INVALID_ARGUMENT', `header line over ${MAX_FILE_HEADER} bytes`));
      }
    };
    const onEnd = (): void => {
      cleanup();
      reject(new AegisError('UNAVAILABLE', 'the connection ended before its header line'));
    };
    const onError = (err: Error): void => {
      cleanup();
      reject(new AegisError('UNAVAILABLE', `the connection failed: ${err.message}`));
    };
    stream.on('data', onData);
    stream.once('end', onEnd);
    stream.once('close', onEnd);
    stream.once('error', onError);
    stream.resume(); // a 'data' listener does not restart a stream paused by an earlier call
  });
}

/** A JSON line, parsed (no prototype tricks: JSON.parse gives plain data). */
export function parseJsonLine(line: string): unknown {
  try {
    return JSON.parse(line) as unknown;
  } catch {
    throw new AegisError('INVALID_ARGUMENT', 'not a JSON line');
  }
}
