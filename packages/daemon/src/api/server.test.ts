import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import type { Logger } from '../log.js';
import { makePrivateDirs } from '../config.js';
import type { DaemonContext } from '../daemon.js';
import { Registry } from '../registry/db.js';
import { imageRoutes } from './routes/images.js';
import { instanceRoutes } from './routes/instances.js';
import { fileRoutes } from './routes/files.js';
import { secretRoutes } from './routes/secrets.js';
import { systemRoutes } from './routes/system.js';
import {
  DISCARD_BYTES,
  MAX_BODY_BYTES,
  STREAMED,
  boolQuery,
  createServer,
  intQuery,
  startStream,
  type RequestContext,
  type Route,
} from './server.js';

interface Response {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
}

function codeOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return err instanceof AegisError ? err.code : 'not an AegisError';
  }
  return undefined;
}

function json(r: Response): unknown {
  return JSON.parse(r.text) as unknown;
}

interface RawResponse {
  status: number;
  headers: Record<string, string>;
  text: string;
  body: unknown;
}

/** Sends bytes as they are on a fresh connection; returns all that comes back until the server closes it (or 3 s). */
function rawExchange(socketPath: string, data: string | Buffer, end = true): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    const s = net.connect(socketPath);
    const done = (): void => {
      clearTimeout(timer);
      s.destroy();
      resolve(Buffer.concat(chunks).toString('latin1'));
    };
    const timer = setTimeout(done, 3000);
    s.on('data', (c: Buffer) => chunks.push(c));
    s.on('end', done);
    s.on('close', done);
    s.on('error', (err: NodeJS.ErrnoException) => (err.code === 'EPIPE' || err.code === 'ECONNRESET' ? done() : reject(err)));
    if (end) s.end(data);
    else s.write(data);
  });
}

/** The first HTTP/1.1 response in `text`, its body parsed as JSON when it is some. */
function parseRaw(text: string): RawResponse {
  const split = text.indexOf('\r\n\r\n');
  const head = split === -1 ? text : text.slice(0, split);
  const [statusLine = '', ...lines] = head.split('\r\n');
  const headers: Record<string, string> = {};
  for (const l of lines) {
    const i = l.indexOf(':');
    if (i > 0) headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
  }
  const bodyText = split === -1 ? '' : text.slice(split + 4, split + 4 + Number(headers['content-length'] ?? 0));
  let body: unknown;
  try {
    body = JSON.parse(bodyText) as unknown;
  } catch {
    body = undefined;
  }
  return { status: Number(/^HTTP\/1\.[01] (\d{3}) /.exec(statusLine)?.[1] ?? 0), headers, text: bodyText, body };
}

describe('createServer', () => {
  let dir: string;
  let socketPath: string;
  let server: http.Server;
  let warnings: string[];
  let seen: RequestContext[];
  let abortedSeen = false;

  function request(method: string, urlPath: string, body?: string | Buffer): Promise<Response> {
    return new Promise((resolve, reject) => {
      const req = http.request({ socketPath, path: urlPath, method, agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      req.on('error', reject);
      req.end(body);
    });
  }

  const raw = (data: string | Buffer, end = true): Promise<string> => rawExchange(socketPath, data, end);

  const routes: Route[] = [
    {
      method: 'GET',
      path: '/v1/secrets',
      handler: (ctx) => {
        seen.push(ctx);
        return Promise.resolve({ status: 200, body: { secrets: ['listed'] } });
      },
    },
    {
      method: 'GET',
      path: '/v1/things/{ref}',
      handler: (ctx) => {
        seen.push(ctx);
        return Promise.resolve({ status: 200, body: { ref: ctx.params['ref'] } });
      },
    },
    {
      method: 'DELETE',
      path: '/v1/things/{ref}',
      handler: () => Promise.resolve({ status: 204 }),
    },
    {
      method: 'POST',
      path: '/v1/things',
      handler: (ctx) => {
        seen.push(ctx);
        return Promise.resolve({ status: 201, body: { got: ctx.body ?? null } });
      },
    },
    {
      method: 'GET',
      path: '/v1/things/{ref}/files/{name}',
      handler: ({ params }) => Promise.resolve({ status: 200, body: params }),
    },
    {
      method: 'POST',
      path: '/v1/refuse',
      handler: () => Promise.reject(new AegisError('FAILED_PRECONDITION', 'cannot do that: it is stopped')),
    },
    {
      method: 'POST',
      path: '/v1/crash',
      handler: () => Promise.reject(new Error('boom')),
    },
    {
      method: 'GET',
      path: '/v1/throws-sync',
      handler: () => {
        throw new TypeError('not a promise rejection');
      },
    },
    {
      method: 'GET',
      path: '/v1/stream',
      handler: ({ res }) => {
        const write = startStream(res);
        write({ n: 1 });
        write({ n: 2 });
        res.end();
        return Promise.resolve(STREAMED);
      },
    },
    {
      method: 'GET',
      path: '/v1/stream-fails',
      handler: ({ res }) => {
        const write = startStream(res);
        write({ n: 1 });
        return Promise.reject(new AegisError('UNAVAILABLE', 'agent went away'));
      },
    },
    {
      method: 'GET',
      path: '/v1/wait-for-abort',
      handler: ({ signal, res }) => {
        startStream(res)({ waiting: true });
        return new Promise((resolve) => {
          signal.addEventListener('abort', () => {
            abortedSeen = true;
            resolve(STREAMED);
          });
        });
      },
    },
  ];

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-server-test-'));
    socketPath = path.join(dir, 'api.sock');
    warnings = [];
    seen = [];
    abortedSeen = false;
    const logger: Logger = { info() {}, warn: (m) => void warnings.push(m) };
    server = createServer(routes, logger);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(socketPath, () => resolve());
    });
  });

  afterEach(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it('answers a matching route with its status and a JSON body', async () => {
    const r = await request('GET', '/v1/things/abc');
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toBe('application/json');
    expect(r.headers['content-length']).toBe(String(Buffer.byteLength(r.text)));
    expect(json(r)).toEqual({ ref: 'abc' });
  });

  it('answers a reply without a body with an empty response', async () => {
    const r = await request('DELETE', '/v1/things/abc');
    expect(r.status).toBe(204);
    expect(r.text).toBe('');
  });

  it('answers an unknown path with 404 NOT_FOUND', async () => {
    const r = await request('GET', '/v1/nothing-here');
    expect(r.status).toBe(404);
    expect(r.headers['content-type']).toBe('application/json');
    expect(json(r)).toEqual({ code: 'NOT_FOUND', message: expect.stringContaining('/v1/nothing-here') as unknown });
  });

  it('does not match a path prefix or a path with extra segments', async () => {
    expect((await request('GET', '/v1/things/abc/extra')).status).toBe(404);
    expect((await request('GET', '/v1/things/')).status).toBe(404);
    expect((await request('GET', '/v1/thingsX')).status).toBe(404);
  });

  // Regression: the answer was 501 (and to HEAD, which has no body, a bare 501).
  it('a wrong method on a known path is answered 405 UNSUPPORTED with a JSON body and an Allow header, not 501', async () => {
    const r = await request('PUT', '/v1/things/abc');
    expect(r.status).toBe(405);
    expect(r.headers['content-type']).toBe('application/json');
    expect(r.headers['allow']).toBe('GET, DELETE');
    const body = json(r) as { code: string; message: string };
    expect(body.code).toBe('UNSUPPORTED');
    expect(body.message).toContain('PUT');
    expect(body.message).toContain('/v1/things/abc');
    const head = await request('HEAD', '/v1/things/abc/files/x');
    expect(head.status).toBe(405);
    expect(head.headers['allow']).toBe('GET');
    expect((await request('PATCH', '/v1/things')).headers['allow']).toBe('POST');
  });

  it('refuses a body that is not JSON with 400 INVALID_ARGUMENT', async () => {
    const r = await request('POST', '/v1/things', '{"command": [');
    expect(r.status).toBe(400);
    expect(json(r)).toEqual({ code: 'INVALID_ARGUMENT', message: 'request body is not valid JSON' });
    expect(seen).toHaveLength(0);
  });

  it('passes a parsed JSON body to the handler', async () => {
    const r = await request('POST', '/v1/things', JSON.stringify({ command: ['echo', 'hé'] }));
    expect(r.status).toBe(201);
    expect(json(r)).toEqual({ got: { command: ['echo', 'hé'] } });
  });

  it('passes an empty body as undefined', async () => {
    await request('POST', '/v1/things');
    expect(seen[0]?.body).toBeUndefined();
  });

  it('refuses a body over 4 MiB with 413 INVALID_ARGUMENT, which the client, done sending, gets to read', async () => {
    const big = Buffer.alloc(4 * MAX_BODY_BYTES, 0x20);
    // agent: false asks for Connection: close; node's client then sees EPIPE if the server answers
    // and closes while it still writes. The body over the limit is read and dropped first.
    const r = await request('POST', '/v1/things', big);
    expect(r.status).toBe(413);
    expect(json(r)).toEqual({ code: 'INVALID_ARGUMENT', message: `request body over ${MAX_BODY_BYTES} bytes` });
    expect(seen).toHaveLength(0);
  });

  it('an oversized body is refused with 413 and a JSON code, streamed or declared far too large', async () => {
    // Chunked, no length given: not buffered past the limit.
    const streamed = await new Promise<Response>((resolve, reject) => {
      const req = http.request({ socketPath, path: '/v1/things', method: 'POST', agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') }));
      });
      req.on('error', reject);
      const chunk = Buffer.alloc(256 * 1024, 0x20);
      for (let sent = 0; sent <= MAX_BODY_BYTES; sent += chunk.length) req.write(chunk);
      req.end();
    });
    expect(streamed.status).toBe(413);
    expect((json(streamed) as { code: string }).code).toBe('INVALID_ARGUMENT');
    // Declared too large to be worth reading even to drop: answered at once, and closed.
    const declared = parseRaw(
      await raw(`POST /v1/things HTTP/1.1\r\nHost: x\r\nContent-Length: ${MAX_BODY_BYTES + DISCARD_BYTES + 1}\r\n\r\n`, false),
    );
    expect(declared.status).toBe(413);
    expect(declared.headers['connection']).toBe('close');
    expect(declared.body).toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect(seen).toHaveLength(0);
  });

  it('a request refused before its body is read (bad path, wrong method) still gets its answer to a client sending a large body', async () => {
    const big = Buffer.alloc(16 * 1024 * 1024, 0x20);
    for (const [method, p, status] of [
      ['POST', '/v1/things/%00', 405],
      ['PUT', '/v1/things/abc', 405],
      ['POST', '/v1/nowhere', 404],
      ['POST', '/v1/things/../things', 400],
    ] as const) {
      const r = await request(method, p, big);
      expect(r.status, `${method} ${p}`).toBe(status);
      expect((json(r) as { code: string }).code).toMatch(/^[A-Z_]+$/);
    }
    expect(seen).toHaveLength(0);
  });

  it('maps an AegisError from a handler to its HTTP status and code', async () => {
    const r = await request('POST', '/v1/refuse');
    expect(r.status).toBe(409);
    expect(json(r)).toEqual({ code: 'FAILED_PRECONDITION', message: 'cannot do that: it is stopped' });
    expect(warnings).toEqual([]);
  });

  it('maps a plain Error to 500 INTERNAL and logs it', async () => {
    const r = await request('POST', '/v1/crash');
    expect(r.status).toBe(500);
    expect(json(r)).toEqual({ code: 'INTERNAL', message: 'boom' });
    expect(warnings).toHaveLength(1);
    expect(warnings[0]).toContain('POST /v1/crash');
    expect(warnings[0]).toContain('boom');
  });

  it('maps a handler that throws synchronously to 500 INTERNAL too', async () => {
    const r = await request('GET', '/v1/throws-sync');
    expect(r.status).toBe(500);
    expect(json(r)).toEqual({ code: 'INTERNAL', message: 'not a promise rejection' });
  });

  it('decodes percent-encoded path parameters', async () => {
    const r = await request('GET', `/v1/things/${encodeURIComponent('my thing/é%')}`);
    expect(r.status).toBe(200);
    expect(json(r)).toEqual({ ref: 'my thing/é%' });
  });

  it('extracts several path parameters by name', async () => {
    const r = await request('GET', '/v1/things/a%2Bb/files/c.txt');
    expect(json(r)).toEqual({ ref: 'a+b', name: 'c.txt' });
  });

  it('gives the handler the query string, which does not take part in routing', async () => {
    const r = await request('GET', '/v1/things/abc?force=true&tail=5');
    expect(r.status).toBe(200);
    expect(seen[0]?.query.get('force')).toBe('true');
    expect(seen[0]?.query.get('tail')).toBe('5');
    expect(seen[0]?.params).toEqual({ ref: 'abc' });
  });

  // Regression: a malformed escape used to surface as a 500 INTERNAL (URIError).
  it('refuses a malformed percent-escape in a path parameter as INVALID_ARGUMENT', async () => {
    const r = await request('GET', '/v1/things/%E0%A4%A');
    expect(r.status).toBe(400);
    expect((json(r) as { code: string }).code).toBe('INVALID_ARGUMENT');
  });

  // Regression: new URL() resolved `..` (and `%2e%2e`, and `\\`), so these reached GET /v1/secrets.
  it('a path with . or .. segments reaches another route no more: it is INVALID_ARGUMENT, raw or percent-encoded', async () => {
    for (const p of [
      '/v1/things/../secrets',
      '/v1/things/x/files/../../../secrets',
      '/v1/things/%2e%2e/secrets',
      '/v1/things/.%2E/secrets',
      '/v1/things/%2E./secrets',
      '/v1/./secrets',
      '/v1/%2e/secrets',
      '/v1/secrets/.',
      '/v1/secrets/..',
      '/v1\\things\\..\\secrets',
      '/v1/things/x/files/..?x=1',
    ]) {
      const r = await request('GET', p);
      expect(r.status, p).toBe(400);
      expect(json(r), p).toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
    expect(seen).toHaveLength(0);
    // A request target that is not a path (absolute-form, asterisk-form) is not routed either.
    for (const target of ['http://aegisd/v1/secrets', '*']) {
      const r = parseRaw(await raw(`GET ${target} HTTP/1.1\r\nHost: x\r\n\r\n`));
      expect(r.status, target).toBe(400);
      expect(r.body, target).toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
    expect(seen).toHaveLength(0);
  });

  it('a percent-encoded slash stays inside its path parameter, and cannot carry . or .. components', async () => {
    const ok = await request('GET', '/v1/things/registry%3A5000%2Fteam%2Ftools%3A1.2');
    expect(json(ok)).toEqual({ ref: 'registry:5000/team/tools:1.2' });
    for (const p of ['/v1/things/x%2F..%2F..%2Fsecrets', '/v1/things/..%2Fsecrets', '/v1/things/a%2F.%2Fb']) {
      const r = await request('GET', p);
      expect(r.status, p).toBe(400);
      expect(json(r), p).toMatchObject({ code: 'INVALID_ARGUMENT' });
    }
    expect(seen).toHaveLength(1);
  });

  it('a NUL byte or another control character in a path parameter is INVALID_ARGUMENT before the handler runs', async () => {
    for (const p of ['/v1/things/a%00b', '/v1/things/%00', '/v1/things/a%0Ab', '/v1/things/x/files/%7F']) {
      const r = await request('GET', p);
      expect(r.status, p).toBe(400);
      expect(json(r), p).toMatchObject({ code: 'INVALID_ARGUMENT', message: expect.stringContaining('control characters') as unknown });
    }
    expect(seen).toHaveLength(0);
  });

  // Regression: node answered these itself, with a bare status line and no body.
  it('a request the HTTP parser rejects gets a JSON {code, message} body too, not a bare 400', async () => {
    const cases: [string, number][] = [
      ['GARBAGE\r\n\r\n', 400],
      ['FOO /v1/things HTTP/1.1\r\nHost: x\r\n\r\n', 400],
      ['GET /v1/things/a HTTP/9.9\r\nHost: x\r\n\r\n', 400],
      ['POST /v1/things HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}', 400],
      ['POST /v1/things HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}', 400],
      ['POST /v1/things HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n', 400],
      ['GET /v1/things/a HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n', 400],
      ['GET /v1/things/a HTTP/1.1\r\nHost: x\r\nX-Partial', 400],
      [`GET /v1/things/a HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`, 431],
      ['CONNECT localhost:22 HTTP/1.1\r\nHost: localhost:22\r\n\r\n', 405],
      ['POST /v1/things HTTP/1.1\r\nHost: x\r\nExpect: the-unexpected\r\nContent-Length: 2\r\n\r\n{}', 417],
    ];
    for (const [data, status] of cases) {
      const r = parseRaw(await raw(data));
      const what = JSON.stringify(data.slice(0, 60));
      expect(r.status, what).toBe(status);
      expect(r.headers['content-type'], what).toBe('application/json');
      expect(r.body, what).toEqual({ code: expect.stringMatching(/^[A-Z_]+$/) as unknown, message: expect.any(String) as unknown });
    }
    expect(seen).toHaveLength(0);
  });

  // Regression: node answered an HTTP/1.1 request without Host with a bare 400 of its own.
  it('an HTTP/1.1 request without a Host header is served like any other, not answered with a bare 400', async () => {
    const r = parseRaw(await raw('GET /v1/things/abc HTTP/1.1\r\n\r\n'));
    expect(r.status).toBe(200);
    expect(r.body).toEqual({ ref: 'abc' });
    const missing = parseRaw(await raw('GET /v1/nowhere HTTP/1.1\r\n\r\n'));
    expect(missing.status).toBe(404);
    expect(missing.body).toMatchObject({ code: 'NOT_FOUND' });
  });

  it('a body cut off mid-way by the client is no INTERNAL error and logs no warning', async () => {
    const r = parseRaw(await raw('POST /v1/things HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"a":'));
    // The parser answers the truncated request itself (EOF before the body's end).
    expect(r.status).toBe(400);
    expect(r.body).toMatchObject({ code: 'INVALID_ARGUMENT' });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(warnings).toEqual([]);
    expect(seen).toHaveLength(0);
  });

  it('every error the router itself gives has a JSON code: unknown route, wrong method, bad path, bad body', async () => {
    for (const [method, p, body] of [
      ['GET', '/nowhere', undefined],
      ['GET', '/', undefined],
      ['DELETE', '/v1/things', undefined],
      ['GET', '/v1/things/%zz', undefined],
      ['POST', '/v1/things', '{"a":'],
      ['POST', '/v1/things', '\u0000'],
      ['POST', '/v1/things', Buffer.from([0xff, 0xfe, 0x00])],
    ] as const) {
      const r = await request(method, p, body);
      expect(r.status, `${method} ${p}`).toBeGreaterThanOrEqual(400);
      expect(r.headers['content-type']).toBe('application/json');
      expect(json(r)).toEqual({ code: expect.stringMatching(/^[A-Z_]+$/) as unknown, message: expect.any(String) as unknown });
    }
  });

  it('streams NDJSON events written by a handler', async () => {
    const r = await request('GET', '/v1/stream');
    expect(r.status).toBe(200);
    expect(r.headers['content-type']).toBe('application/x-ndjson');
    expect(r.text).toBe('{"n":1}\n{"n":2}\n');
  });

  it('ends a stream that fails midway with an error event instead of a second status', async () => {
    const r = await request('GET', '/v1/stream-fails');
    expect(r.status).toBe(200);
    const events = r.text
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as unknown);
    expect(events).toEqual([{ n: 1 }, { type: 'error', code: 'UNAVAILABLE', message: 'agent went away' }]);
  });

  it('aborts the handler signal when the client goes away', async () => {
    await new Promise<void>((resolve, reject) => {
      const req = http.request({ socketPath, path: '/v1/wait-for-abort', agent: false }, (res) => {
        res.once('data', () => req.destroy());
        res.on('error', () => undefined);
      });
      req.on('error', () => undefined);
      req.on('close', () => resolve());
      req.on('timeout', () => reject(new Error('timeout')));
      req.end();
    });
    await expect.poll(() => abortedSeen).toBe(true);
  });
});

describe('the daemon routes on the server, against stubbed services', () => {
  let dir: string;
  let socketPath: string;
  let server: http.Server;
  /** Every call the routes made into the (stubbed) services. */
  let calls: string[];

  /** A service whose every method records its call; nothing behind it boots or stores anything. */
  const stub = (name: string): unknown =>
    new Proxy(
      {},
      {
        get: (_t, method) => (): Promise<object> => {
          calls.push(`${name}.${String(method)}`);
          return Promise.resolve({});
        },
      },
    );

  function send(method: string, urlPath: string, body?: unknown): Promise<{ status: number; body: unknown }> {
    return new Promise((resolve, reject) => {
      const req = http.request({ socketPath, path: urlPath, method, agent: false }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          resolve({ status: res.statusCode ?? 0, body: text === '' ? undefined : (JSON.parse(text) as unknown) });
        });
      });
      req.on('error', reject);
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  }

  beforeEach(async () => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-routes-test-'));
    socketPath = path.join(dir, 'api.sock');
    calls = [];
    const ctx = {
      version: 'test',
      config: { home: dir },
      backend: { name: 'stub' },
      probe: { detail: 'stub' },
      instances: stub('instances'),
      secrets: stub('secrets'),
      images: stub('images'),
      shutdown: () => Promise.resolve(),
    } as unknown as DaemonContext;
    const logger: Logger = { info() {}, warn() {} };
    server = createServer(
      [...systemRoutes(ctx), ...instanceRoutes(ctx), ...fileRoutes(ctx), ...secretRoutes(ctx), ...imageRoutes(ctx)],
      logger,
    );
    await new Promise<void>((resolve) => server.listen(socketPath, () => resolve()));
  });

  afterEach(async () => {
    server.closeAllConnections();
    await new Promise<void>((resolve) => server.close(() => resolve()));
    fs.rmSync(dir, { recursive: true, force: true });
  });

  async function expectRefused(method: string, urlPath: string, body?: unknown): Promise<string> {
    const r = await send(method, urlPath, body);
    const what = `${method} ${urlPath} ${JSON.stringify(body)}`;
    expect(r.status, what).toBe(400);
    expect(r.body, what).toMatchObject({ code: 'INVALID_ARGUMENT' });
    return (r.body as { message: string }).message;
  }

  // Regression: the VM booted, then the harness choked on the NUL: 500 INTERNAL.
  it('a NUL byte in a create request is INVALID_ARGUMENT at validation, before any VM is touched', async () => {
    for (const body of [
      { command: ['echo', 'a\u0000b'] },
      { command: ['\u0000'] },
      { command: ['x'], env: { A: 'v\u0000' } },
      { command: ['x'], env: { 'A\u0000': 'v' } },
      { command: ['x'], workdir: '/srv\u0000/app' },
      { command: ['x'], handle: 'web\u0000' },
      { command: ['x'], secrets: ['TOKEN\u0000'] },
      { image: 'alpine\u0000:3' },
    ]) {
      expect(await expectRefused('POST', '/v1/instances', body)).toMatch(/NUL|invalid name|pattern/);
    }
    expect(calls).toEqual([]);
  });

  it('a NUL byte in an exec request, a secret or an image request is INVALID_ARGUMENT at validation too', async () => {
    for (const body of [
      { command: ['ls', '\u0000'] },
      { command: ['ls'], env: { A: '\u0000' } },
      { command: ['ls'], workdir: '/\u0000' },
    ]) {
      expect(await expectRefused('POST', '/v1/instances/web/exec', body)).toContain('must not contain a NUL byte');
    }
    await expectRefused('POST', '/v1/instances/web%00/exec', { command: ['ls'] });
    await expectRefused('PUT', '/v1/secrets/TOKEN%00', { value: 'v' });
    await expectRefused('DELETE', '/v1/secrets/TOKEN%00');
    await expectRefused('PUT', '/v1/secrets/TOKEN', { value: 'v\u0000' });
    await expectRefused('POST', '/v1/images/pull', { reference: 'alpine\u0000' });
    await expectRefused('POST', '/v1/images/import', { path: '/tmp/x\u0000.tar' });
    await expectRefused('GET', '/v1/images/alpine%00');
    expect(calls).toEqual([]);
  });

  // Regression: listen() resolved the name, so a DNS query left the machine.
  it('an exposed hostIp that is not an IP literal is INVALID_ARGUMENT, and never resolved', async () => {
    for (const hostIp of ['not-an-ip', 'localhost', 'example.com', '', '127.1', '1.2.3.4.5', '::1::']) {
      const msg = await expectRefused('POST', '/v1/instances', { command: ['x'], secrets: ['NOPE'], exposes: [{ guestPort: 80, hostIp }] });
      expect(msg, hostIp).toContain('exposes.0.hostIp');
    }
    expect(calls).toEqual([]);
    for (const hostIp of ['127.0.0.1', '0.0.0.0', '::1', '::']) {
      expect((await send('POST', '/v1/instances', { command: ['x'], exposes: [{ guestPort: 80, hostIp }] })).status, hostIp).toBe(201);
    }
    expect(calls).toEqual(['instances.create', 'instances.create', 'instances.create', 'instances.create']);
  });

  // Regression: both reached other routes (GET /v1/status, GET /v1/secrets) through new URL().
  it('/v1/instances/../status and /v1/instances/x/logs/../../../secrets are INVALID_ARGUMENT, not other routes', async () => {
    for (const p of [
      '/v1/instances/../status',
      '/v1/instances/x/logs/../../../secrets',
      '/v1/instances/%2e%2e/status',
      '/v1/instances/x/logs/%2E%2E/%2e%2e/%2e%2e/secrets',
      '/v1/images/x%2F..%2F..%2Fsecrets',
    ]) {
      await expectRefused('GET', p);
    }
    await expectRefused('POST', '/v1/instances/x/../../shutdown');
    expect(calls).toEqual([]);
    // While a plain GET /v1/secrets still lists them.
    expect((await send('GET', '/v1/secrets')).status).toBe(200);
    expect(calls).toEqual(['secrets.list']);
  });

  it('a wrong method on a real route is 405 UNSUPPORTED with a code, and an unknown route 404 NOT_FOUND with one', async () => {
    expect(await send('DELETE', '/v1/status')).toMatchObject({ status: 405, body: { code: 'UNSUPPORTED' } });
    expect(await send('GET', '/v1/shutdown')).toMatchObject({ status: 405, body: { code: 'UNSUPPORTED' } });
    expect(await send('GET', '/v1/instances/x/exec')).toMatchObject({ status: 405, body: { code: 'UNSUPPORTED' } });
    expect(await send('GET', '/v2/status')).toMatchObject({ status: 404, body: { code: 'NOT_FOUND' } });
    expect(calls).toEqual([]);
  });
});

describe('file permissions of the daemon', () => {
  let dir: string;
  let oldUmask: number;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-perm-test-'));
    oldUmask = process.umask(0o022);
  });

  afterEach(() => {
    process.umask(oldUmask);
    fs.rmSync(dir, { recursive: true, force: true });
  });

  const mode = (p: string): string => (fs.statSync(p).mode & 0o7777).toString(8);

  // Regression: an existing AEGIS_HOME kept its 0755; only a new one was created 0700.
  it('an existing 0755 AEGIS_HOME and instances dir are tightened to 0700 at daemon start', async () => {
    const home = path.join(dir, 'home');
    const instancesDir = path.join(home, 'instances');
    fs.mkdirSync(instancesDir, { recursive: true, mode: 0o755 });
    fs.chmodSync(home, 0o755);
    fs.chmodSync(instancesDir, 0o755);
    await makePrivateDirs({ home, instancesDir });
    expect(mode(home)).toBe('700');
    expect(mode(instancesDir)).toBe('700');
    // And created 0700 when absent, whatever the umask.
    process.umask(0);
    const fresh = path.join(dir, 'fresh', 'home');
    await makePrivateDirs({ home: fresh, instancesDir: path.join(fresh, 'instances') });
    expect(mode(fresh)).toBe('700');
    expect(mode(path.join(fresh, 'instances'))).toBe('700');
  });

  it('a shared sticky directory as AEGIS_HOME is refused, not chmodded', async () => {
    const shared = path.join(dir, 'shared');
    fs.mkdirSync(shared);
    fs.chmodSync(shared, 0o1777);
    const err = await makePrivateDirs({ home: shared, instancesDir: path.join(shared, 'instances') }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(AegisError);
    expect((err as AegisError).code).toBe('FAILED_PRECONDITION');
    expect(mode(shared)).toBe('1777');
  });

  // Regression: aegis.db (and its -wal/-shm) were 0644 under the usual umask 022.
  it('aegis.db and its -wal/-shm are 0600, created so and tightened when an older aegisd left them 0644', () => {
    const file = path.join(dir, 'aegis.db');
    new Registry(file).close();
    expect(mode(file)).toBe('600');
    // An older daemon's files, world-readable, with a WAL left behind.
    fs.chmodSync(file, 0o644);
    fs.writeFileSync(`${file}-wal`, '', { mode: 0o644 });
    const r = new Registry(file);
    try {
      r.putSecret('A', Buffer.from('x'), 1);
      for (const f of [file, `${file}-wal`, `${file}-shm`]) expect(mode(f), f).toBe('600');
    } finally {
      r.close();
    }
    // The umask was restored after the open.
    expect(process.umask(0o022)).toBe(0o022);
  });
});

describe('boolQuery', () => {
  const q = (s: string): URLSearchParams => new URLSearchParams(s);

  it('reads an absent flag as false', () => {
    expect(boolQuery(q(''), 'force')).toBe(false);
  });

  it('reads true, 1 and a bare flag as true', () => {
    expect(boolQuery(q('force=true'), 'force')).toBe(true);
    expect(boolQuery(q('force=1'), 'force')).toBe(true);
    expect(boolQuery(q('force'), 'force')).toBe(true);
    expect(boolQuery(q('force='), 'force')).toBe(true);
  });

  it('reads false and 0 as false', () => {
    expect(boolQuery(q('force=false'), 'force')).toBe(false);
    expect(boolQuery(q('force=0'), 'force')).toBe(false);
  });

  it('refuses anything else with INVALID_ARGUMENT naming the parameter', () => {
    for (const v of ['yes', 'TRUE', '2', 'on']) {
      expect(() => boolQuery(q(`force=${v}`), 'force')).toThrow(
        new AegisError('INVALID_ARGUMENT', 'query parameter force must be true or false'),
      );
      expect(codeOf(() => boolQuery(q(`force=${v}`), 'force'))).toBe('INVALID_ARGUMENT');
    }
  });

  it('looks at the first value when a flag is repeated', () => {
    expect(boolQuery(q('force=false&force=true'), 'force')).toBe(false);
  });
});

describe('intQuery', () => {
  const q = (s: string): URLSearchParams => new URLSearchParams(s);

  it('reads an absent parameter as undefined', () => {
    expect(intQuery(q(''), 'tail')).toBeUndefined();
  });

  it('reads a non-negative integer', () => {
    expect(intQuery(q('tail=0'), 'tail')).toBe(0);
    expect(intQuery(q('tail=42'), 'tail')).toBe(42);
    expect(intQuery(q('tail=007'), 'tail')).toBe(7);
    expect(intQuery(q('tail=999999999'), 'tail')).toBe(999_999_999);
    expect(intQuery(q('since=1795496272000'), 'since')).toBe(1_795_496_272_000);
  });

  it('refuses negatives, fractions, words, empty values and numbers over fifteen digits', () => {
    for (const v of ['-1', '1.5', 'ten', '', '1e3', ' 1', '1000000000000000', '0x10']) {
      let err: unknown;
      try {
        intQuery(new URLSearchParams([['tail', v]]), 'tail');
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(v)).toBeInstanceOf(AegisError);
      expect((err as AegisError).code).toBe('INVALID_ARGUMENT');
      expect((err as AegisError).message).toContain('tail');
    }
  });
});

describe('idle connections', () => {
  it('closes a connection that never sends and one left idle after its answer, never one with a quiet request in flight', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-idle-conn-'));
    const socketPath = path.join(dir, 'api.sock');
    const quiet: Route = {
      method: 'GET',
      path: '/v1/quiet',
      handler: async () => {
        await new Promise((r) => setTimeout(r, 900)); // three idle periods with nothing on the wire
        return { status: 200, body: { ok: true } };
      },
    };
    const server = createServer([quiet], { info() {}, warn() {} }, { idleConnectionMs: 300 });
    await new Promise<void>((resolve) => server.listen(socketPath, resolve));
    try {
      const closedAfter = (socket: net.Socket): Promise<number> => {
        const t0 = Date.now();
        return new Promise((resolve) => socket.once('close', () => resolve(Date.now() - t0)));
      };
      const silent = net.connect(socketPath);
      const idle = net.connect(socketPath, () => idle.write('GET /v1/quiet HTTP/1.1\r\nHost: x\r\n\r\n'));
      let answer = '';
      idle.on('data', (c: Buffer) => (answer += c.toString()));
      const [silentMs, idleMs] = await Promise.all([closedAfter(silent), closedAfter(idle)]);
      expect(silentMs).toBeGreaterThanOrEqual(250);
      expect(answer).toMatch(/^HTTP\/1\.1 200 OK/); // answered after 900 quiet ms, then closed once idle
      expect(idleMs).toBeGreaterThanOrEqual(900);
    } finally {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
