/**
 * The daemon's HTTP server on a unix socket: routing, JSON bodies, NDJSON streams, and the
 * one place where errors become `{code, message}` responses.
 */
import http from 'node:http';
import { AegisError } from '@aegis/protocol';
import type { Logger } from '../log.js';

export interface RequestContext {
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
  /** Aborted when the client goes away. */
  signal: AbortSignal;
  res: http.ServerResponse;
}

export type Handler = (ctx: RequestContext) => Promise<Reply | Streamed>;
export interface Reply {
  status: number;
  body?: unknown;
}
/** The handler wrote the response itself (a stream). */
export const STREAMED = Symbol('streamed');
export type Streamed = typeof STREAMED;

export interface Route {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** OpenAPI-style path, e.g. /v1/instances/{ref}/exec */
  path: string;
  handler: Handler;
}

const MAX_BODY_BYTES = 4 * 1024 * 1024;

function compile(path: string): RegExp {
  const src = path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{(\w+)\\?\}/g, '(?<$1>[^/]+)');
  return new RegExp(`^${src}$`);
}

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of req as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > MAX_BODY_BYTES) throw new AegisError('INVALID_ARGUMENT', `request body over ${MAX_BODY_BYTES} bytes`);
    chunks.push(chunk);
  }
  if (size === 0) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
  } catch {
    throw new AegisError('INVALID_ARGUMENT', 'request body is not valid JSON');
  }
}

export function sendJson(res: http.ServerResponse, status: number, body?: unknown): void {
  if (body === undefined) {
    res.writeHead(status).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
}

/** Starts an NDJSON stream; returns a writer that ignores writes once the client has gone. */
export function startStream(res: http.ServerResponse): (event: unknown) => void {
  res.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
  res.flushHeaders();
  return (event) => {
    if (!res.destroyed && !res.writableEnded) res.write(JSON.stringify(event) + '\n');
  };
}

export function createServer(routes: Route[], log: Logger): http.Server {
  const table = routes.map((r) => ({ ...r, re: compile(r.path) }));
  return http.createServer((req, res) => {
    void (async () => {
      const abort = new AbortController();
      res.on('close', () => abort.abort());
      try {
        const url = new URL(req.url ?? '/', 'http://aegisd');
        let pathMatched = false;
        for (const route of table) {
          const m = route.re.exec(url.pathname);
          if (!m) continue;
          pathMatched = true;
          if (route.method !== req.method) continue;
          const params: Record<string, string> = {};
          for (const [k, v] of Object.entries(m.groups ?? {})) {
            try {
              params[k] = decodeURIComponent(v);
            } catch {
              throw new AegisError('INVALID_ARGUMENT', `malformed escape in path parameter ${k}`);
            }
          }
          const body = await readBody(req);
          const out = await route.handler({ params, query: url.searchParams, body, signal: abort.signal, res });
          if (out !== STREAMED) sendJson(res, out.status, out.body);
          return;
        }
        throw pathMatched
          ? new AegisError('UNSUPPORTED', `${req.method ?? ''} is not supported on ${url.pathname}`)
          : new AegisError('NOT_FOUND', `no such endpoint: ${url.pathname}`);
      } catch (err) {
        const e = AegisError.from(err);
        if (e.code === 'INTERNAL') log.warn(`${req.method ?? ''} ${req.url ?? ''}: ${e.message}`);
        if (res.headersSent) {
          // Mid-stream: the error becomes the stream's last event.
          if (!res.writableEnded) res.end(JSON.stringify({ type: 'error', ...e.toWire() }) + '\n');
        } else {
          sendJson(res, e.httpStatus, e.toWire());
        }
      }
    })();
  });
}

/** Reads a boolean query flag strictly. */
export function boolQuery(q: URLSearchParams, name: string): boolean {
  const v = q.get(name);
  if (v === null || v === 'false' || v === '0') return false;
  if (v === '' || v === 'true' || v === '1') return true;
  throw new AegisError('INVALID_ARGUMENT', `query parameter ${name} must be true or false`);
}

export function intQuery(q: URLSearchParams, name: string): number | undefined {
  const v = q.get(name);
  if (v === null) return undefined;
  // 15 digits: enough for epoch milliseconds, safely inside Number's exact range.
  if (!/^\d{1,15}$/.test(v)) throw new AegisError('INVALID_ARGUMENT', `query parameter ${name} must be a non-negative integer`);
  return Number(v);
}
