/**
 * envd's HTTP file transfer: `GET /files?path=` streams a file out, `POST /files` writes one
 * (an `application/octet-stream` body, gzip allowed) or several (`multipart/form-data`, each
 * part's filename its path), creating parent directories as envd does, and answers the
 * written entries. Bytes go through the guest file service (`Instance.files`) unbuffered for
 * both encodings (multipart is read as a stream, part by part: multipart.ts).
 */
import type http from 'node:http';
import type http2 from 'node:http2';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import { AegisError } from '@aegis/protocol';
import type { Instance } from '../instances/instance.js';
import { guestPath } from './context.js';
import { makeDirs } from './filesystem.js';
import { boundaryOf, multipartParts } from './multipart.js';

export type Req = http.IncomingMessage | http2.Http2ServerRequest;
export type Res = http.ServerResponse | http2.Http2ServerResponse;

interface Written {
  name: string;
  type: 'file';
  path: string;
}

async function writeOne(instance: Instance, full: string, body: Readable, size: number | undefined, signal: AbortSignal): Promise<Written> {
  const dir = path.posix.dirname(full);
  if (dir !== '/') await makeDirs(instance, dir, signal);
  const { data } = await instance.files({ op: 'write', path: full, ...(size !== undefined ? { size } : {}) }, body, signal);
  data.resume();
  return { name: path.posix.basename(full), type: 'file', path: full };
}

/** GET /files: the file's bytes. */
export async function readFile(instance: Instance, query: URLSearchParams, res: Res, signal: AbortSignal): Promise<void> {
  const p = guestPath(query.get('path') ?? '', query.get('username') || undefined);
  const { stat, data } = await instance.files({ op: 'read', path: p }, undefined, signal);
  const headers: Record<string, string | number> = { 'content-type': 'application/octet-stream', 'cache-control': 'no-store' };
  if (stat) headers['content-length'] = stat.size;
  res.writeHead(200, headers);
  await pipeline(data, res as NodeJS.WritableStream).catch(() => res.destroy());
}

/** POST /files: writes the body (or each multipart part) and answers the entries. */
export async function writeFiles(instance: Instance, query: URLSearchParams, req: Req, signal: AbortSignal): Promise<Written[]> {
  const user = query.get('username') || undefined;
  const given = query.get('path');
  const type = String(req.headers['content-type'] ?? '');
  const gzip = /\bgzip\b/i.test(String(req.headers['content-encoding'] ?? ''));
  const body: Readable = gzip ? (req as Readable).pipe(zlib.createGunzip()) : (req as Readable);
  if (!/^multipart\/form-data/i.test(type)) {
    if (!given) throw new AegisError('INVALID_ARGUMENT', 'query parameter path is required for an octet-stream upload');
    const length = req.headers['content-length'];
    const size = !gzip && typeof length === 'string' && /^\d{1,15}$/.test(length) ? Number(length) : undefined;
    return [await writeOne(instance, guestPath(given, user), body, size, signal)];
  }
  // Each part streams into its file as it arrives. A part is a file (its filename the path) or a
  // plain field (its value the content, for `path`).
  const out: Written[] = [];
  for await (const part of multipartParts(body, boundaryOf(type))) {
    const name = part.filename || given;
    if (!name) {
      part.data.resume();
      throw new AegisError('INVALID_ARGUMENT', 'a part has no filename and no path was given');
    }
    try {
      out.push(await writeOne(instance, guestPath(name, user), part.data, undefined, signal));
    } catch (err) {
      part.data.destroy();
      throw err;
    }
  }
  if (out.length === 0) throw new AegisError('INVALID_ARGUMENT', 'the multipart body has no file');
  return out;
}
