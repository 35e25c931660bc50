/**
 * The files API: read, write, stat, list, mkdir and remove one path in an instance, and tar
 * archives in and out (`aegis cp`, as Docker's GET/PUT /containers/{id}/archive). Bytes stream
 * through in both directions (no size limit in memory): HTTP body ↔ data channel ↔ guest.
 */
import type http from 'node:http';
import { pipeline } from 'node:stream/promises';
import { AegisError, type FileStat } from '@aegis/protocol';
import type { DaemonContext } from '../../daemon.js';
import { readEntries } from '../../instances/files.js';
import { validateBody } from '../validate.js';
import { boolQuery, reply, STREAMED, type Route } from '../server.js';

function ref(params: Record<string, string>): string {
  const v = params['ref'];
  if (v === undefined) throw new AegisError('INVALID_ARGUMENT', 'missing ref');
  return v;
}

/** The `path` query parameter: absolute, at most 4096 characters, no NUL. */
function pathQuery(q: URLSearchParams): string {
  const p = q.get('path');
  if (p === null || !p.startsWith('/')) throw new AegisError('INVALID_ARGUMENT', 'query parameter path must be an absolute guest path');
  if (p.length > 4096 || p.includes('\0'))
    throw new AegisError('INVALID_ARGUMENT', 'query parameter path must be at most 4096 characters, no NUL');
  return p;
}

/** `mode` in octal, as chmod takes it (`644`, `0755`). */
function modeQuery(q: URLSearchParams): number | undefined {
  const m = q.get('mode');
  if (m === null) return undefined;
  if (!/^0?[0-7]{3,4}$/.test(m)) throw new AegisError('INVALID_ARGUMENT', 'query parameter mode must be octal, e.g. 0644');
  return parseInt(m, 8);
}

/**
 * The stat a guest's answer must carry (the harness sends one for each of these operations):
 * without it there is no body the API promises.
 */
function statOf(stat: FileStat | undefined, op: string): FileStat {
  if (!stat) throw new AegisError('INTERNAL', `the guest answered ${op} without one`);
  return stat;
}

/** Copies the guest's bytes into the response; a transfer the guest cuts short ends the response early. */
async function sendBytes(res: http.ServerResponse, headers: Record<string, string | number>, data: NodeJS.ReadableStream): Promise<void> {
  res.writeHead(200, { 'cache-control': 'no-store', ...headers });
  await pipeline(data, res).catch(() => res.destroy());
}

export function fileRoutes(d: DaemonContext): Route[] {
  const m = d.instances;
  return [
    {
      method: 'GET',
      path: '/v1/instances/{ref}/files',
      handler: async ({ params, query, signal, res }) => {
        const { stat, data } = await m.instance(ref(params)).files({ op: 'read', path: pathQuery(query) }, undefined, signal);
        await sendBytes(
          res,
          {
            'content-type': 'application/octet-stream',
            ...(stat ? { 'content-length': stat.size, 'x-aegis-file-mode': stat.mode.toString(8).padStart(4, '0') } : {}),
          },
          data,
        );
        return STREAMED;
      },
    },
    {
      method: 'PUT',
      path: '/v1/instances/{ref}/files',
      rawBody: true,
      handler: async ({ params, query, signal, req }) => {
        const mode = modeQuery(query);
        // Known length: the guest checks it got every byte before it replaces the file.
        const length = req.headers['content-length'];
        const size = length !== undefined && /^\d{1,15}$/.test(length) ? Number(length) : undefined;
        const op = {
          op: 'write' as const,
          path: pathQuery(query),
          ...(mode !== undefined ? { mode } : {}),
          ...(size !== undefined ? { size } : {}),
        };
        const { stat, data } = await m.instance(ref(params)).files(op, req, signal);
        data.resume();
        return reply('writeFile', 200, statOf(stat, 'write'));
      },
    },
    {
      method: 'DELETE',
      path: '/v1/instances/{ref}/files',
      handler: async ({ params, query, signal }) => {
        const { data } = await m
          .instance(ref(params))
          .files({ op: 'remove', path: pathQuery(query), recursive: boolQuery(query, 'recursive') }, undefined, signal);
        data.resume();
        return { status: 204 };
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/files/stat',
      handler: async ({ params, query, signal }) => {
        const { stat, data } = await m.instance(ref(params)).files({ op: 'stat', path: pathQuery(query) }, undefined, signal);
        data.resume();
        return reply('statFile', 200, statOf(stat, 'stat'));
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/files/list',
      handler: async ({ params, query, signal }) => {
        const { data } = await m.instance(ref(params)).files({ op: 'list', path: pathQuery(query) }, undefined, signal);
        return reply('listFiles', 200, { entries: await readEntries(data) });
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/files/mkdir',
      handler: async ({ params, body, signal }) => {
        const req = validateBody('MkdirRequest', body);
        const op = {
          op: 'mkdir' as const,
          path: req.path,
          parents: req.parents === true,
          ...(req.mode !== undefined ? { mode: req.mode } : {}),
        };
        const { stat, data } = await m.instance(ref(params)).files(op, undefined, signal);
        data.resume();
        return reply('makeDirectory', 200, statOf(stat, 'mkdir'));
      },
    },
    {
      method: 'GET',
      path: '/v1/instances/{ref}/archive',
      handler: async ({ params, query, signal, res }) => {
        const op = { op: 'tarOut' as const, path: pathQuery(query) };
        const { stat, data } = await m.instance(ref(params)).files(op, undefined, signal);
        // What was archived, as Docker's X-Docker-Container-Path-Stat: the client needs it to
        // decide where the copy goes before it reads the tar.
        const statHeader: Record<string, string> = stat
          ? { 'x-aegis-path-stat': Buffer.from(JSON.stringify(stat)).toString('base64') }
          : {};
        await sendBytes(res, { 'content-type': 'application/x-tar', ...statHeader }, data);
        return STREAMED;
      },
    },
    {
      method: 'PUT',
      path: '/v1/instances/{ref}/archive',
      rawBody: true,
      handler: async ({ params, query, signal, req }) => {
        const op = { op: 'tarIn' as const, path: pathQuery(query), keepOwner: boolQuery(query, 'keepOwner') };
        const { stat, data } = await m.instance(ref(params)).files(op, req, signal);
        data.resume();
        return reply('putArchive', 200, statOf(stat, 'tarIn'));
      },
    },
  ];
}
