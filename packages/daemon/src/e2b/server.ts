/**
 * The E2B endpoint: one loopback TCP address serving E2B's REST control plane and, for
 * requests carrying `E2b-Sandbox-Id` (what the `e2b` SDK sends everything to when
 * E2B_SANDBOX_URL is set), envd's Connect-RPC services and its HTTP file transfer. HTTP/1.1
 * and cleartext HTTP/2 (prior knowledge) share the port: the first bytes of a connection say
 * which. Every request is checked for Host/Origin (DNS rebinding, web pages) and then for the
 * API key (REST) or the sandbox's access token (envd) before anything else runs.
 */
import http from 'node:http';
import http2 from 'node:http2';
import net from 'node:net';
import { Duplex } from 'node:stream';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { createContextValues } from '@connectrpc/connect';
import { connectNodeAdapter } from '@connectrpc/connect-node';
import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import { escapeForLog, type Logger } from '../log.js';
import { ADDR_FILE, E2bKeys, signatureMatches } from './keys.js';
import { checkHostAndOrigin, parseLoopbackAddr, type LoopbackAddr } from '../http/loopback.js';
import { ERROR_CODE_HEADER, envdHttpStatus, restError, asAegis } from './errors.js';
import { cloudOnly, e2bState, pausedByRequest, PRIVATE_TRAFFIC_LABEL, sandboxRoutes, type RestRoute } from './sandboxes.js';
import { ENVD_PORT, RAW_REQUEST, sandboxInstance, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER } from './context.js';
import { processService, ProcessTable } from './process.js';
import { filesystemService } from './filesystem.js';
import { readFile, writeFiles, type Req, type Res } from './files-http.js';
import { hostTarget, proxy } from './proxy.js';
import type { Instance } from '../instances/instance.js';
import { Process } from './gen/process/process_pb.js';
import { Filesystem } from './gen/filesystem/filesystem_pb.js';

/** The largest REST body read (E2B's bodies are small JSON). */
const MAX_REST_BODY = 1024 * 1024;

/** `AEGIS_E2B_ADDR` / `aegis up --e2b`: `HOST:PORT` on loopback (port 0: any free one). */
export function parseAddr(addr: string): LoopbackAddr {
  return parseLoopbackAddr(addr, 'E2B endpoint');
}

function header(req: Req, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function sendJson(res: Res, status: number, body: unknown, headers: Record<string, string> = {}): void {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  const text = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(body === undefined ? {} : { 'content-type': 'application/json' }),
    'content-length': Buffer.byteLength(text),
    ...headers,
  });
  res.end(text);
}

async function readJson(req: Req): Promise<unknown> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const c of req as AsyncIterable<Buffer>) {
    size += c.length;
    if (size > MAX_REST_BODY) throw new AegisError('INVALID_ARGUMENT', `the body is larger than ${MAX_REST_BODY} bytes`);
    chunks.push(c);
  }
  if (size === 0) return undefined;
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8')) as unknown;
  } catch {
    throw new AegisError('INVALID_ARGUMENT', 'the body is not valid JSON');
  }
}

export interface E2bEndpoint {
  /** What E2B_API_URL and E2B_SANDBOX_URL are set to. */
  url: string;
  close(): Promise<void>;
}

export async function startE2bEndpoint(d: DaemonContext, addr: string, log: Logger): Promise<E2bEndpoint> {
  const { host, port } = parseAddr(addr);
  const keys = await E2bKeys.open(d.config.home);
  const table = new ProcessTable();
  const envd = connectNodeAdapter({
    contextValues: (req) => createContextValues().set(RAW_REQUEST, req as Req),
    routes: (router) => {
      router.service(Process, processService(d, table));
      router.service(Filesystem, filesystemService(d));
    },
  });
  let ours = { host, port };
  let routes: RestRoute[] = [];

  const rest = async (req: Req, res: Res, url: URL, signal: AbortSignal): Promise<void> => {
    keys.checkApiKey(header(req, 'x-api-key'));
    const method = req.method ?? 'GET';
    for (const r of routes) {
      const m = r.pattern.exec(url.pathname);
      if (!m || r.method !== method) continue;
      const body = method === 'GET' || method === 'DELETE' ? undefined : await readJson(req);
      const out = await r.handler({ params: m.slice(1).map(decodeURIComponent), query: url.searchParams, body, signal });
      sendJson(res, out.status, out.body, out.headers);
      return;
    }
    const cloud = cloudOnly(url.pathname);
    if (cloud) {
      sendJson(res, cloud.status, cloud.body, { [ERROR_CODE_HEADER]: 'UNSUPPORTED' });
      return;
    }
    sendJson(
      res,
      404,
      { code: 404, message: `${method} ${url.pathname} is not part of the E2B API aegisd serves` },
      { [ERROR_CODE_HEADER]: 'NOT_FOUND' },
    );
  };

  /** The instance of sandbox `id`, or undefined after answering 502 as E2B's proxy does (the SDK: the sandbox ended). */
  const reach = (res: Res, id: string): Instance | undefined => {
    let instance: Instance;
    try {
      instance = sandboxInstance(d, id);
    } catch (err) {
      const e = asAegis(err);
      if (e.code !== 'NOT_FOUND') throw e;
      sendJson(res, 502, { sandboxId: id, code: 502, message: 'The sandbox was not found' }, { [ERROR_CODE_HEADER]: e.code });
      return undefined;
    }
    // Paused through E2B (or by `aegis pause`/`hibernate`): unreachable until Sandbox.connect(),
    // as in E2B. One paused for idleness is woken by the call instead (--idle-pause).
    if (pausedByRequest(instance.view())) {
      sendJson(
        res,
        502,
        { sandboxId: id, code: 502, message: 'The sandbox is paused: Sandbox.connect() resumes it' },
        { [ERROR_CODE_HEADER]: 'FAILED_PRECONDITION' },
      );
      return undefined;
    }
    return instance;
  };

  /** getHost traffic: public unless the sandbox was made with allowPublicTraffic: false. */
  const portCall = async (req: Req, res: Res, id: string, port: number, host: string): Promise<void> => {
    const instance = reach(res, id);
    if (!instance) return;
    if (instance.view().labels?.[PRIVATE_TRAFFIC_LABEL] !== undefined) keys.checkTrafficToken(id, header(req, 'e2b-traffic-access-token'));
    await proxy(instance, port, req, res, host);
  };

  const sandboxCall = async (req: Req, res: Res, url: URL, id: string, signal: AbortSignal): Promise<void> => {
    const portHeader = header(req, SANDBOX_PORT_HEADER);
    if (portHeader !== undefined && portHeader !== '' && Number(portHeader) !== ENVD_PORT) {
      const port = Number(portHeader);
      if (!Number.isInteger(port) || port < 1 || port > 65535)
        throw new AegisError('INVALID_ARGUMENT', `E2b-Sandbox-Port ${portHeader} is not a port`);
      return portCall(req, res, id, port, `localhost:${port}`);
    }
    keys.checkAccessToken(id, header(req, 'x-access-token'), header(req, 'x-api-key'));
    await envdCall(req, res, url, id, signal);
  };

  /**
   * A signed file URL carries no sandbox id (E2B routes it by host name): the sandbox is the one
   * whose access token made the signature.
   */
  const signedFilesCall = async (req: Req, res: Res, url: URL, signal: AbortSignal): Promise<void> => {
    const q = url.searchParams;
    const signed = {
      path: q.get('path') ?? '',
      operation: req.method === 'POST' ? ('write' as const) : ('read' as const),
      user: q.get('username') ?? '',
      signature: q.get('signature') ?? '',
      expiration: q.get('signature_expiration'),
    };
    const match = d.instances.list(false).find((v) => e2bState(v.state) && signatureMatches(signed, keys.accessToken(v.id)));
    if (!match) throw new AegisError('UNAUTHENTICATED', 'invalid signature');
    if (signed.expiration !== null && Number(signed.expiration) < Date.now() / 1000) {
      throw new AegisError('UNAUTHENTICATED', 'signature is already expired');
    }
    await envdCall(req, res, url, match.id, signal);
  };

  /** envd's own endpoints, the caller's right to the sandbox checked. */
  const envdCall = async (req: Req, res: Res, url: URL, id: string, signal: AbortSignal): Promise<void> => {
    const instance = reach(res, id);
    if (!instance) return;
    if (url.pathname === '/health') {
      res.writeHead(204);
      res.end();
      return;
    }
    if (url.pathname === '/files') {
      if (req.method === 'GET') return readFile(instance, url.searchParams, res, signal);
      if (req.method === 'POST') {
        sendJson(res, 200, await writeFiles(instance, url.searchParams, req, signal));
        return;
      }
    }
    if (url.pathname.startsWith('/process.Process/') || url.pathname.startsWith('/filesystem.Filesystem/')) {
      envd(req, res);
      return;
    }
    sendJson(res, 404, { code: 404, message: `${req.method ?? 'GET'} ${url.pathname} is not part of envd as aegisd serves it` });
  };

  const handle = (req: Req, res: Res): void => {
    const controller = new AbortController();
    res.once('close', () => controller.abort());
    const signal = controller.signal;
    const id = header(req, SANDBOX_ID_HEADER);
    const hostHeader = header(req, 'host') ?? header(req, ':authority');
    void (async () => {
      checkHostAndOrigin(hostHeader, header(req, 'origin'), ours);
      const url = new URL(req.url ?? '/', 'http://e2b.invalid');
      const target = hostTarget(hostHeader);
      if (target) await portCall(req, res, target.id, target.port, `localhost:${target.port}`);
      else if (id !== undefined && id !== '') await sandboxCall(req, res, url, id, signal);
      else if (url.pathname === '/files' && url.searchParams.has('signature')) await signedFilesCall(req, res, url, signal);
      else await rest(req, res, url, signal);
    })().catch((err: unknown) => {
      const { status, code, body } = restError(err);
      const sandbox = id !== undefined && id !== '';
      const s = sandbox ? envdHttpStatus(code) : status;
      if (s >= 500 && code !== 'UNSUPPORTED' && code !== 'UNAVAILABLE')
        // The path and message may carry a client's or a guest's text: escaped, one line.
        log.warn(
          `e2b: ${escapeForLog(req.method ?? '', 16)} ${escapeForLog((req.url ?? '').split('?')[0] ?? '')}: [${code}] ${escapeForLog(body.message)}`,
        );
      sendJson(res, s, { ...body, code: s }, { [ERROR_CODE_HEADER]: code });
    });
  };

  const h1 = http.createServer(handle);
  h1.keepAliveTimeout = 30_000;
  const h2 = http2.createServer(handle);
  // HTTP/2 with prior knowledge starts with "PRI * HTTP/2.0"; anything else is HTTP/1.1.
  const server = net.createServer((socket) => {
    socket.once('data', (first: Buffer) => {
      socket.pause();
      socket.unshift(first);
      if (first.subarray(0, 3).toString('latin1') === 'PRI') {
        // HTTP/2 reads a net.Socket's handle directly, past what was put back: give it a JS stream.
        h2.emit('connection', Duplex.from({ readable: socket, writable: socket }));
      } else h1.emit('connection', socket);
      socket.resume();
    });
    socket.on('error', () => socket.destroy());
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const bound = server.address() as net.AddressInfo;
  ours = { host, port: bound.port };
  const hostForUrl = host.includes(':') ? `[${host}]` : host;
  const url = `http://${hostForUrl}:${bound.port}`;
  // getHost(port) → <port>-<id>.localhost:<our port> (see sandboxOf's domain).
  routes = sandboxRoutes(d, keys, `localhost:${bound.port}`);
  const addrFile = path.join(d.config.home, ADDR_FILE);
  await fs.writeFile(addrFile, `${url}\n`, { mode: 0o600 });
  log.info(`e2b endpoint listening on ${url} (E2B_API_URL and E2B_SANDBOX_URL; key in ${path.join(d.config.home, 'e2b.key')})`);
  return {
    url,
    async close() {
      await fs.rm(addrFile, { force: true });
      server.close();
      h1.closeAllConnections();
      await new Promise<void>((resolve) => h2.close(() => resolve()));
    },
  };
}
