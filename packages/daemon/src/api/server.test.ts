import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import type { Logger } from '../log.js';
import { STREAMED, boolQuery, createServer, intQuery, startStream, type RequestContext, type Route } from './server.js';

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

  const routes: Route[] = [
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

  it('answers a known path with the wrong method with UNSUPPORTED', async () => {
    const r = await request('PUT', '/v1/things/abc');
    expect(r.status).toBe(501);
    const body = json(r) as { code: string; message: string };
    expect(body.code).toBe('UNSUPPORTED');
    expect(body.message).toContain('PUT');
    expect(body.message).toContain('/v1/things/abc');
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

  it('refuses a body over 4 MiB with 400 INVALID_ARGUMENT', async () => {
    const big = Buffer.alloc(4 * 1024 * 1024 + 1, 0x20);
    const r = await request('POST', '/v1/things', big).catch((err: NodeJS.ErrnoException) => err);
    // The server may answer before it has read everything; either way the handler never runs.
    if (!(r instanceof Error)) {
      expect(r.status).toBe(400);
      expect((json(r) as { code: string }).code).toBe('INVALID_ARGUMENT');
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
