/**
 * The dashboard's server (issue 24, `AEGIS_UI_ADDR`, `aegis up --ui`): one loopback TCP address
 * serving the browser bundle (@aegis/ui's dist/), and a pass-through to aegisd's own HTTP API —
 * `/api/v1/…` and `/metrics` are forwarded, as they are, to the unix socket, so every page
 * action is an ordinary API call answered by the same handlers as the CLI's (nothing here
 * implements an operation). `/ws/exec` bridges a WebSocket to an interactive exec (the API's
 * `exec` with `tty` and `stdin`, its `input` and `resize`), which a browser cannot drive over
 * plain HTTP as a terminal needs.
 *
 * The browser is a client holding the token: every request and WebSocket upgrade needs it
 * (`?token=` on the first page load, which answers with an HttpOnly SameSite=Strict cookie and
 * a redirect that takes the token out of the address bar; or `Authorization: Bearer`), and
 * every one is checked for Host (DNS rebinding) and Origin (other pages) first.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import type net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';
import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import { checkHostAndOrigin, ensureSecretFile, parseLoopbackAddr, sameSecret, type LoopbackAddr } from '../http/loopback.js';
import { escapeForLog, type Logger } from '../log.js';
import { bridgeExec } from './exec-bridge.js';

/** The token file (0600): `aegis ui` reads it to print the URL. */
export const TOKEN_FILE = 'ui.token';
/** Where a serving aegisd writes the dashboard's address (removed when it stops). */
export const ADDR_FILE = 'ui.addr';
const TOKEN_RE = /^[0-9a-f]{64}$/;
const COOKIE = 'aegis_ui';

/** @aegis/ui's bundle, beside the daemon's package in this checkout (packages/ui/dist). */
const BUNDLE_DIR = fileURLToPath(new URL('../../../ui/dist/', import.meta.url));

/** What the bundle holds, by request path: nothing else of the directory is served. */
const STATIC: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/app.js': { file: 'app.js', type: 'text/javascript; charset=utf-8' },
  '/app.css': { file: 'app.css', type: 'text/css; charset=utf-8' },
  '/app.js.map': { file: 'app.js.map', type: 'application/json' },
  '/app.css.map': { file: 'app.css.map', type: 'application/json' },
};

/**
 * Every answer: no framing by other pages (clickjacking), no sniffing, no referrer leaving with
 * a URL, and scripts only from here. Styles may be inline: xterm.js writes a <style> element.
 */
const SECURITY_HEADERS: Record<string, string> = {
  'content-security-policy':
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
  'x-frame-options': 'DENY',
  'x-content-type-options': 'nosniff',
  'referrer-policy': 'no-referrer',
  'cache-control': 'no-store',
};

/** `AEGIS_UI_ADDR` / `aegis up --ui`: `HOST:PORT` on loopback (port 0: any free one). */
export function parseUiAddr(addr: string): LoopbackAddr {
  return parseLoopbackAddr(addr, 'dashboard');
}

/** The token in `home`, made (0600) on the first start. */
export function ensureToken(home: string): Promise<string> {
  return ensureSecretFile(home, TOKEN_FILE, TOKEN_RE, () => randomBytes(32).toString('hex'));
}

function header(req: http.IncomingMessage, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function cookieToken(req: http.IncomingMessage): string | undefined {
  for (const part of (header(req, 'cookie') ?? '').split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === COOKIE) return v.join('=');
  }
  return undefined;
}

function bearerToken(req: http.IncomingMessage): string | undefined {
  const m = /^Bearer\s+(\S+)$/i.exec(header(req, 'authorization') ?? '');
  return m?.[1];
}

function sendError(res: http.ServerResponse, err: unknown): void {
  const e = AegisError.from(err);
  const text = JSON.stringify(e.toWire());
  if (res.headersSent) {
    res.destroy();
    return;
  }
  res.writeHead(e.httpStatus, { ...SECURITY_HEADERS, 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** The request headers the API reads (and its own `x-aegis-*`); the browser's (cookie, origin…) stay here. */
const FORWARDED = new Set(['content-type', 'content-length', 'transfer-encoding', 'accept']);

export interface UiServer {
  url: string;
  close(): Promise<void>;
}

export async function startUiServer(d: DaemonContext, addr: string, log: Logger): Promise<UiServer> {
  const { host, port } = parseUiAddr(addr);
  const token = await ensureToken(d.config.home);
  let ours: LoopbackAddr = { host, port };
  const rules = { subdomains: false, exactOrigin: true };

  /** Host and Origin, then the token: throws PERMISSION_DENIED or UNAUTHENTICATED. */
  const admit = (req: http.IncomingMessage, rawPath: string, query: URLSearchParams): void => {
    checkHostAndOrigin(header(req, 'host'), header(req, 'origin'), ours, rules);
    // On the first page load the URL's token wins over an older cookie; elsewhere it is not read.
    const fromQuery = rawPath === '/' ? (query.get('token') ?? undefined) : undefined;
    const given = fromQuery ?? bearerToken(req) ?? cookieToken(req);
    if (given === undefined || given === '') {
      throw new AegisError('UNAUTHENTICATED', 'the dashboard needs its token: open the URL `aegis ui` prints');
    }
    if (!sameSecret(given, token)) throw new AegisError('UNAUTHENTICATED', 'invalid dashboard token (`aegis ui` prints the current URL)');
  };

  /** The request, as it came, to aegisd's socket; the answer, as it comes, back. */
  const forward = (req: http.IncomingMessage, res: http.ServerResponse, target: string): void => {
    const headers: http.OutgoingHttpHeaders = {};
    for (const [name, v] of Object.entries(req.headers)) {
      if (v !== undefined && (FORWARDED.has(name) || name.startsWith('x-aegis-'))) headers[name] = v;
    }
    const upstream = http.request({ socketPath: d.config.socketPath, method: req.method, path: target, headers }, (answer) => {
      const out: http.OutgoingHttpHeaders = { ...SECURITY_HEADERS };
      for (const [k, v] of Object.entries(answer.headers)) if (k !== 'connection' && k !== 'keep-alive' && v !== undefined) out[k] = v;
      res.writeHead(answer.statusCode ?? 502, out);
      // A stream (logs --follow, events) goes out as it comes.
      res.flushHeaders();
      answer.pipe(res);
    });
    upstream.on('error', (err) => sendError(res, new AegisError('UNAVAILABLE', `aegisd's API did not answer: ${err.message}`)));
    // The browser went away: so does the API request (a follow ends, an exec is killed).
    res.once('close', () => upstream.destroy());
    req.pipe(upstream);
  };

  const serveStatic = async (res: http.ServerResponse, entry: { file: string; type: string }): Promise<void> => {
    let body: Buffer;
    try {
      body = await fs.readFile(path.join(BUNDLE_DIR, entry.file));
    } catch {
      throw new AegisError('FAILED_PRECONDITION', `the dashboard's bundle is not built (${BUNDLE_DIR}): run \`make ui\``);
    }
    res.writeHead(200, { ...SECURITY_HEADERS, 'content-type': entry.type, 'content-length': body.length });
    res.end(body);
  };

  const server = http.createServer((req, res) => {
    void (async () => {
      const target = req.url ?? '/';
      // Routed by the path as sent (not as URL would normalise `..`): what is forwarded is what was checked.
      const q = target.indexOf('?');
      const rawPath = q === -1 ? target : target.slice(0, q);
      const query = new URLSearchParams(q === -1 ? '' : target.slice(q + 1));
      admit(req, rawPath, query);
      if (rawPath === '/' && query.has('token')) {
        // The token becomes a cookie only scripts of this origin's requests carry (HttpOnly:
        // no script reads it; Strict: no other site's link or form sends it), and leaves the URL.
        res.writeHead(303, {
          ...SECURITY_HEADERS,
          location: '/',
          'set-cookie': `${COOKIE}=${token}; HttpOnly; SameSite=Strict; Path=/`,
          'content-length': 0,
        });
        res.end();
        return;
      }
      if (rawPath.startsWith('/api/v1/')) return forward(req, res, target.slice('/api'.length));
      if (rawPath === '/metrics' || rawPath === '/api/metrics') return forward(req, res, '/metrics');
      if (rawPath === '/favicon.ico') {
        res.writeHead(204, SECURITY_HEADERS).end();
        return;
      }
      const entry = req.method === 'GET' && Object.hasOwn(STATIC, rawPath) ? STATIC[rawPath] : undefined;
      if (entry) return serveStatic(res, entry);
      throw new AegisError('NOT_FOUND', `no such page: ${rawPath.slice(0, 200)}`);
    })().catch((err: unknown) => {
      const e = AegisError.from(err);
      if (e.code === 'INTERNAL')
        log.warn(`ui: ${escapeForLog(req.method ?? '', 16)} ${escapeForLog(req.url?.split('?')[0] ?? '')}: ${escapeForLog(e.message)}`);
      sendError(res, e);
    });
  });

  const wss = new WebSocketServer({ noServer: true, maxPayload: 1024 * 1024 });
  server.on('upgrade', (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
    const refuse = (err: unknown): void => {
      const e = AegisError.from(err);
      const text = JSON.stringify(e.toWire());
      socket.end(
        `HTTP/1.1 ${e.httpStatus} ${http.STATUS_CODES[e.httpStatus] ?? 'Error'}\r\ncontent-type: application/json\r\n` +
          `content-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`,
      );
    };
    try {
      const url = new URL(req.url ?? '/', 'http://ui.invalid');
      const rawPath = (req.url ?? '/').split('?')[0] ?? '';
      admit(req, rawPath, url.searchParams);
      if (rawPath !== '/ws/exec') throw new AegisError('NOT_FOUND', `no WebSocket at ${rawPath.slice(0, 200)}`);
      const ref = url.searchParams.get('instance') ?? '';
      if (ref === '') throw new AegisError('INVALID_ARGUMENT', 'say which instance: /ws/exec?instance=REF');
      const size = { rows: Number(url.searchParams.get('rows') ?? 24), cols: Number(url.searchParams.get('cols') ?? 80) };
      wss.handleUpgrade(req, socket, head, (ws) => bridgeExec(d.config.socketPath, ref, size, ws, log));
    } catch (err) {
      refuse(err);
    }
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = server.address() as net.AddressInfo;
  ours = { host, port: bound.port };
  const url = `http://${host.includes(':') ? `[${host}]` : host}:${bound.port}`;
  const addrFile = path.join(d.config.home, ADDR_FILE);
  await fs.writeFile(addrFile, `${url}\n`, { mode: 0o600 });
  log.info(`dashboard on ${url} (\`aegis ui\` prints its URL with the token)`);
  return {
    url,
    async close() {
      await fs.rm(addrFile, { force: true });
      for (const c of wss.clients) c.terminate();
      wss.close();
      server.close();
      server.closeAllConnections();
    },
  };
}
