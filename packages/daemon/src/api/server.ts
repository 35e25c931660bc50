/**
 * The daemon's HTTP server on a unix socket: routing, JSON bodies, NDJSON streams, and the
 * one place where errors become `{code, message}` responses.
 */
import http from 'node:http';
import type { Duplex } from 'node:stream';
import { AegisError, type ErrorCode } from '@aegis/protocol';
import type { ApiOperations } from '@aegis/protocol/api';
import type { Logger } from '../log.js';

export interface RequestContext {
  params: Record<string, string>;
  query: URLSearchParams;
  body: unknown;
  /** Aborted when the client goes away. */
  signal: AbortSignal;
  /** The request, for a route that reads its body as a stream (`rawBody`). */
  req: http.IncomingMessage;
  res: http.ServerResponse;
}

export type Handler = (ctx: RequestContext) => Promise<Reply | Streamed>;
export interface Reply {
  status: number;
  body?: unknown;
}
/** The JSON body that operation `Op` of spec/openapi.json answers with `status`. */
export type ResponseBody<Op extends keyof ApiOperations, S extends number> = ApiOperations[Op]['responses'] extends infer R
  ? S extends keyof R
    ? R[S] extends { content: { 'application/json': infer B } }
      ? B
      : never
    : never
  : never;

/**
 * A JSON answer of the spec's operation `op`. The operation id is there for the compiler: the
 * body must have the type generated from that operation's response schema, so a daemon type
 * drifting from spec/openapi.json fails to build.
 */
export function reply<Op extends keyof ApiOperations, S extends number>(_op: Op, status: S, body: ResponseBody<Op, S>): Reply {
  return { status, body };
}

/** The handler wrote the response itself (a stream). */
export const STREAMED = Symbol('streamed');
export type Streamed = typeof STREAMED;

export interface Route {
  method: 'GET' | 'POST' | 'PUT' | 'DELETE';
  /** OpenAPI-style path, e.g. /v1/instances/{ref}/exec */
  path: string;
  handler: Handler;
  /** The body is bytes the handler streams from `req` (no size limit, not parsed); `body` is undefined. */
  rawBody?: boolean;
}

/** The largest request body accepted; a larger one is refused with 413 before any handler runs. */
export const MAX_BODY_BYTES = 4 * 1024 * 1024;

/**
 * How much of a body that is refused is still read, and dropped, before the answer: a client
 * still sending when the server answers and closes gets EPIPE instead of the answer (node's
 * http client does). Beyond it the answer goes out at once and the connection is closed.
 */
export const DISCARD_BYTES = 64 * 1024 * 1024;

/**
 * An error answered with an HTTP status other than its code's own (405, 413, 431...), and
 * possibly extra headers. The code is the stable part; the status only follows HTTP usage.
 */
export class HttpError extends AegisError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly status: number,
    readonly headers: Record<string, string> = {},
  ) {
    super(code, message);
  }

  override get httpStatus(): number {
    return this.status;
  }
}

function compile(path: string): RegExp {
  const src = path.replace(/[.*+?^$()|[\]\\]/g, '\\$&').replace(/\\?\{(\w+)\\?\}/g, '(?<$1>[^/]+)');
  return new RegExp(`^${src}$`);
}

/** `.` or `..`, also spelled with percent-escapes (`%2e`, `.%2E`, ...), as URL parsers read them. */
function isDotSegment(segment: string): boolean {
  const s = segment.replace(/%2e/gi, '.');
  return s === '.' || s === '..';
}

/**
 * Splits a request target into its path and query, as sent: nothing is normalised. (`new
 * URL()` would resolve `..` and `%2e%2e` segments and turn `\\` into `/`, so that
 * /v1/instances/x/logs/../../../secrets reached GET /v1/secrets.) A target that only a
 * normalising reader could route is refused rather than guessed at.
 */
function parseTarget(target: string): { pathname: string; query: URLSearchParams } {
  const q = target.indexOf('?');
  const pathname = q === -1 ? target : target.slice(0, q);
  const query = new URLSearchParams(q === -1 ? '' : target.slice(q + 1));
  if (!pathname.startsWith('/')) {
    throw new AegisError('INVALID_ARGUMENT', `request target must be an absolute path, not ${JSON.stringify(target.slice(0, 200))}`);
  }
  if (pathname.includes('\\') || pathname.split('/').some(isDotSegment)) {
    throw new AegisError(
      'INVALID_ARGUMENT',
      `path ${pathname.slice(0, 200)} has a "." or ".." segment or a backslash; paths are not normalised`,
    );
  }
  return { pathname, query };
}

/**
 * A path parameter, percent-decoded. `%2F` is allowed inside one (image references contain
 * `/`, and routing happened before decoding, so it cannot select another route), but not to
 * smuggle in `.`/`..` components or control characters such as NUL.
 */
function decodeParam(name: string, raw: string): string {
  let v: string;
  try {
    v = decodeURIComponent(raw);
  } catch {
    throw new AegisError('INVALID_ARGUMENT', `malformed escape in path parameter ${name}`);
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f]/.test(v)) {
    throw new AegisError('INVALID_ARGUMENT', `path parameter ${name} must not contain control characters (such as NUL)`);
  }
  if (v.split('/').some((c) => c === '.' || c === '..')) {
    throw new AegisError('INVALID_ARGUMENT', `path parameter ${name} must not contain "." or ".." components`);
  }
  return v;
}

const tooLarge = (close: boolean): HttpError =>
  new HttpError('INVALID_ARGUMENT', `request body over ${MAX_BODY_BYTES} bytes`, 413, close ? { connection: 'close' } : {});

async function readBody(req: http.IncomingMessage): Promise<unknown> {
  // Node has checked the header's syntax. Not worth reading even to drop: refused unread.
  const declared = Number(req.headers['content-length'] ?? 0);
  if (declared > MAX_BODY_BYTES + DISCARD_BYTES) throw tooLarge(true);
  const chunks: Buffer[] = [];
  let size = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      // Over the limit, the rest is read but not kept (see DISCARD_BYTES).
      if (size > MAX_BODY_BYTES + DISCARD_BYTES) throw tooLarge(true);
      if (size <= MAX_BODY_BYTES) chunks.push(chunk);
    }
  } catch (err) {
    // Not a daemon fault (no INTERNAL, no warning): the client went away, or sent a body the
    // parser rejected (answered by onClientError), before the body was whole.
    throw err instanceof AegisError ? err : new AegisError('CANCELLED', 'the request body was cut off', { cause: err });
  }
  if (size > MAX_BODY_BYTES) throw tooLarge(false);
  if (size === 0) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
  } catch {
    throw new AegisError('INVALID_ARGUMENT', 'request body is not valid JSON');
  }
}

/**
 * Reads and drops what is left of a request's body (up to DISCARD_BYTES) before an error is
 * answered, so that the client gets to read the answer. False when it was too much.
 */
async function discardBody(req: http.IncomingMessage): Promise<boolean> {
  if (req.complete || req.destroyed) return req.complete;
  let size = 0;
  try {
    for await (const chunk of req as AsyncIterable<Buffer>) {
      size += chunk.length;
      if (size > DISCARD_BYTES) return false;
    }
    return true;
  } catch {
    return false;
  }
}

export function sendJson(res: http.ServerResponse, status: number, body?: unknown, headers: Record<string, string> = {}): void {
  if (body === undefined) {
    res.writeHead(status, headers).end();
    return;
  }
  const text = JSON.stringify(body);
  res.writeHead(status, { ...headers, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) }).end(text);
}

/** Starts an NDJSON stream; returns a writer that ignores writes once the client has gone. */
/**
 * Starts an NDJSON stream. Writing returns undefined, or, when the client reads slower than
 * events come, a promise that resolves once it has caught up (or gone): producers that can
 * wait (a replay from disk, a guest that can be paused) wait on it, so the response never
 * buffers without bound. One that cannot wait (a live log follower) is cut off past
 * `STREAM_MAX_BUFFERED_BYTES` with a final RESOURCE_EXHAUSTED event.
 */
export function startStream(res: http.ServerResponse): (event: unknown) => Promise<void> | undefined {
  res.writeHead(200, { 'content-type': 'application/x-ndjson', 'cache-control': 'no-store' });
  res.flushHeaders();
  return (event) => {
    if (res.destroyed || res.writableEnded) return undefined;
    if (res.writableLength > STREAM_MAX_BUFFERED_BYTES) {
      res.end(JSON.stringify({ type: 'error', code: 'RESOURCE_EXHAUSTED', message: 'the client read too slowly; stream ended' }) + '\n');
      return undefined;
    }
    if (res.write(JSON.stringify(event) + '\n')) return undefined;
    return new Promise<void>((resolve) => {
      const done = (): void => {
        res.off('drain', done);
        res.off('close', done);
        resolve();
      };
      res.once('drain', done);
      res.once('close', done);
    });
  };
}

/** What a stream may hold for a client that does not read before it is cut off. */
export const STREAM_MAX_BUFFERED_BYTES = 16 * 1024 * 1024;

/** A whole response written straight to a socket the HTTP parser has given up on; then closed. */
function rawError(socket: Duplex, status: number, code: ErrorCode, message: string): void {
  const text = JSON.stringify({ code, message });
  socket.end(
    `HTTP/1.1 ${status} ${http.STATUS_CODES[status] ?? 'Error'}\r\n` +
      `content-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`,
    () => socket.destroy(),
  );
}

/**
 * Node answers requests its parser rejects (garbage, unknown methods, bad Content-Length or
 * chunking, oversized headers, timeouts) with a bare status and no body; here they get a
 * `{code, message}` body like every other error.
 */
function onClientError(err: NodeJS.ErrnoException, socket: Duplex): void {
  // Like node's own handler: answer only if no response to this connection has started.
  const inFlight = (socket as Duplex & { _httpMessage?: http.ServerResponse | null })._httpMessage;
  if (err.code === 'ECONNRESET' || !socket.writable || inFlight?.headersSent === true) {
    socket.destroy();
    return;
  }
  switch (err.code) {
    case 'HPE_HEADER_OVERFLOW':
      rawError(socket, 431, 'INVALID_ARGUMENT', 'request headers too large');
      return;
    case 'HPE_CHUNK_EXTENSIONS_OVERFLOW':
      rawError(socket, 413, 'INVALID_ARGUMENT', 'chunk extensions too large');
      return;
    case 'ERR_HTTP_REQUEST_TIMEOUT':
      rawError(socket, 408, 'TIMEOUT', 'the request was not received in time');
      return;
    default:
      rawError(socket, 400, 'INVALID_ARGUMENT', `malformed HTTP request (${err.code ?? err.message})`);
  }
}

/**
 * A connection with no request in flight is closed after this long without a byte either way:
 * a client that keeps one open idle, or connects and never sends, would otherwise hold a file
 * descriptor for ever (node closes only connections whose headers are slow, not silent ones).
 * A request in flight may be quiet as long as it likes (`logs --follow`, `wait`, an exec).
 */
export const IDLE_CONNECTION_MS = 30_000;

export function createServer(routes: Route[], log: Logger, options: { idleConnectionMs?: number } = {}): http.Server {
  const table = routes.map((r) => ({ ...r, re: compile(r.path) }));
  // No Host required (node's default answers a bare 400 without one): on a unix socket the
  // socket, not a host name, says which server this is.
  const server = http.createServer({ requireHostHeader: false }, (req, res) => {
    void (async () => {
      const abort = new AbortController();
      res.on('close', () => abort.abort());
      try {
        const { pathname, query } = parseTarget(req.url ?? '');
        const allowed: string[] = [];
        for (const route of table) {
          const m = route.re.exec(pathname);
          if (!m) continue;
          if (route.method !== req.method) {
            allowed.push(route.method);
            continue;
          }
          const params: Record<string, string> = {};
          for (const [k, v] of Object.entries(m.groups ?? {})) params[k] = decodeParam(k, v);
          const body = route.rawBody ? undefined : await readBody(req);
          const out = await route.handler({ params, query, body, signal: abort.signal, req, res });
          if (out !== STREAMED) sendJson(res, out.status, out.body);
          return;
        }
        if (allowed.length > 0) {
          // 405 with Allow, as HTTP has it; the code stays UNSUPPORTED, which this answer always
          // carried: codes are permanent (protocol/errors.ts) and clients read the code, not
          // the status. (Not INVALID_ARGUMENT: nothing in the request is malformed, the
          // resource just does not support the method.)
          throw new HttpError(
            'UNSUPPORTED',
            `${req.method ?? ''} is not supported on ${pathname.slice(0, 200)}; use ${allowed.join(', ')}`,
            405,
            {
              allow: allowed.join(', '),
            },
          );
        }
        throw new AegisError('NOT_FOUND', `no such endpoint: ${pathname.slice(0, 200)}`);
      } catch (err) {
        const e = AegisError.from(err);
        if (e.code === 'INTERNAL') log.warn(`${req.method ?? ''} ${req.url ?? ''}: ${e.message}`);
        if (res.headersSent) {
          // Mid-stream: the error becomes the stream's last event.
          if (!res.writableEnded) res.end(JSON.stringify({ type: 'error', ...e.toWire() }) + '\n');
        } else {
          // Refused before its body was read (bad path, wrong method): drop the body first,
          // unless the answer closes the connection anyway (a body far too large).
          const headers = e instanceof HttpError ? e.headers : {};
          const drained = headers['connection'] === 'close' || (await discardBody(req));
          sendJson(res, e.httpStatus, e.toWire(), drained ? headers : { ...headers, connection: 'close' });
        }
      }
    })();
  });
  const inFlight = new WeakMap<Duplex, number>();
  server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    const socket = req.socket;
    inFlight.set(socket, (inFlight.get(socket) ?? 0) + 1);
    res.once('close', () => inFlight.set(socket, (inFlight.get(socket) ?? 1) - 1));
  });
  const idleMs = options.idleConnectionMs ?? IDLE_CONNECTION_MS;
  // Between requests node times a kept-alive connection by this instead (then asks the handler below).
  server.keepAliveTimeout = Math.min(server.keepAliveTimeout, idleMs);
  server.setTimeout(idleMs, (socket: Duplex) => {
    if ((inFlight.get(socket) ?? 0) === 0) socket.destroy();
  });
  server.on('clientError', onClientError);
  // An Expect other than 100-continue: node would answer a bare 417.
  server.on('checkExpectation', (req: http.IncomingMessage, res: http.ServerResponse) => {
    sendJson(
      res,
      417,
      { code: 'INVALID_ARGUMENT', message: `unsupported Expect: ${String(req.headers.expect).slice(0, 100)}` },
      { connection: 'close' },
    );
  });
  // CONNECT: node would close the connection without a word.
  server.on('connect', (_req: http.IncomingMessage, socket: Duplex) => {
    rawError(socket, 405, 'UNSUPPORTED', 'CONNECT is not supported');
  });
  return server;
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
