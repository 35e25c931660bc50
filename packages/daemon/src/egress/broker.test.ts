/**
 * The secret broker against real servers on loopback: an HTTPS upstream whose certificate comes
 * from a test CA (given to the broker as its upstream roots) and a plain HTTP one. The guest is
 * emulated over a duplexPair, as the data channel hands connections over: a TLS client that
 * trusts only the instance CA, and Node's HTTP client on top of it.
 */
import 'reflect-metadata';
import crypto, { webcrypto } from 'node:crypto';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net, { type AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import * as x509 from '@peculiar/x509';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { duplexPair } from '../ports/duplex-pair.js';
import { instanceCa, placeholderFor, SecretBroker, type BrokeredSecret, type InstanceCa } from './broker.js';
import { serverName } from './server-name.js';

const SEED = Buffer.alloc(32, 7);
const DAY_MS = 24 * 3600_000;
const API: BrokeredSecret = {
  placeholder: placeholderFor(SEED, 'API_KEY'),
  value: 'sk-live THE/REAL&VALUE 123',
  hosts: ['api.example.test'],
};
const OTHER: BrokeredSecret = { placeholder: placeholderFor(SEED, 'OTHER_KEY'), value: 'other-REAL-VALUE-456', hosts: ['*.other.test'] };
const VALUES = [API.value, encodeURIComponent(API.value), OTHER.value];

interface Seen {
  method: string;
  url: string;
  headers: http.IncomingHttpHeaders;
  body: string;
}

let brokerCa: InstanceCa;
let upstreamCa: InstanceCa;
let secure: https.Server;
let plain: http.Server;
const got: Seen[] = [];

/** A server certificate for `names`, signed by `ca`. */
async function serverCert(ca: InstanceCa, names: string[]): Promise<{ key: string; cert: string }> {
  const alg = { name: 'ECDSA', namedCurve: 'P-256' };
  const keys = (await webcrypto.subtle.generateKey(alg, true, ['sign', 'verify'])) as webcrypto.CryptoKeyPair;
  const caDer = crypto.createPrivateKey(ca.keyPem).export({ type: 'pkcs8', format: 'der' });
  const caKey = await webcrypto.subtle.importKey('pkcs8', caDer, alg, false, ['sign']);
  const cert = await x509.X509CertificateGenerator.create({
    subject: 'CN=upstream',
    issuer: new x509.X509Certificate(ca.certPem).subjectName,
    notBefore: new Date(Date.now() - DAY_MS),
    notAfter: new Date(Date.now() + DAY_MS),
    publicKey: keys.publicKey,
    signingKey: caKey,
    signingAlgorithm: { name: 'ECDSA', hash: 'SHA-256' },
    extensions: [new x509.SubjectAlternativeNameExtension(names.map((value) => ({ type: 'dns' as const, value })))],
  });
  const key = crypto
    .createPrivateKey({ key: Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey)), format: 'der', type: 'pkcs8' })
    .export({ type: 'pkcs8', format: 'pem' }) as string;
  return { key, cert: cert.toString('pem') };
}

/** Records what it got; /missing is a 404 and /redirect repeats the query in its Location. */
function upstreamHandler(req: http.IncomingMessage, res: http.ServerResponse): void {
  const chunks: Buffer[] = [];
  req.on('data', (c: Buffer) => chunks.push(c));
  req.on('end', () => {
    got.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers, body: Buffer.concat(chunks).toString() });
    const route = (req.url ?? '').split('?')[0] ?? '';
    if (route === '/missing') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not here\n');
    } else if (route === '/stream') {
      // No length: a chunked body, in two pieces a moment apart.
      res.writeHead(200, { 'content-type': 'text/plain' });
      res.write('part one, ');
      setTimeout(() => res.end('part two\n'), 20);
    } else if (route === '/redirect') {
      res.writeHead(302, { location: `https://api.example.test/next${(req.url ?? '').slice(route.length)}` }).end();
    } else {
      res.writeHead(200, { 'content-type': 'text/plain', 'x-upstream': 'yes' }).end('hello from upstream\n');
    }
  });
}

function portOf(server: http.Server): number {
  return (server.address() as AddressInfo).port;
}

beforeAll(async () => {
  [brokerCa, upstreamCa] = await Promise.all([instanceCa(SEED, 'i-test'), instanceCa(Buffer.alloc(32, 9), 'upstream test')]);
  secure = https.createServer(await serverCert(upstreamCa, ['api.example.test', '*.other.test', 'plain.example.test']), upstreamHandler);
  plain = http.createServer(upstreamHandler);
  secure.listen(0, '127.0.0.1');
  plain.listen(0, '127.0.0.1');
  await Promise.all([once(secure, 'listening'), once(plain, 'listening')]);
});

afterAll(() => {
  secure.closeAllConnections();
  plain.closeAllConnections();
  secure.close();
  plain.close();
});

function broker(options: Partial<ConstructorParameters<typeof SecretBroker>[0]> = {}): SecretBroker {
  return new SecretBroker({ ca: brokerCa, secrets: [API, OTHER], upstreamCa: [upstreamCa.certPem], ...options });
}

function firstChunk(s: Duplex): Promise<Buffer> {
  return new Promise((resolve) =>
    s.once('data', (c: Buffer) => {
      s.pause();
      resolve(c);
    }),
  );
}

/** A guest TLS connection through `b` to the HTTPS upstream; `seen` is every plaintext byte the guest receives. */
async function guestTls(
  b: SecretBroker,
  name: string,
  trust: string = brokerCa.certPem,
): Promise<{ socket: tls.TLSSocket; seen: Buffer[]; agent: http.Agent }> {
  const [g, h] = duplexPair();
  const socket = tls.connect({ socket: g, servername: name, ca: [trust], ALPNProtocols: ['h2', 'http/1.1'] });
  const head = await firstChunk(h);
  const found = serverName(head);
  expect(found).toEqual({ kind: 'tls', name });
  expect(b.brokers(name)).toBe(true);
  b.handle(h, { address: '127.0.0.1', port: portOf(secure) }, head, name);
  await once(socket, 'secureConnect');
  const seen: Buffer[] = [];
  socket.on('data', (c: Buffer) => seen.push(c));
  return { socket, seen, agent: agentOver(socket) };
}

/** An HTTP client agent whose one connection is `socket` (kept alive between requests). */
function agentOver(socket: Duplex, keepAlive = true): http.Agent {
  const agent = new http.Agent({ keepAlive, maxSockets: 1 });
  Object.assign(agent, { createConnection: () => socket });
  return agent;
}

async function send(
  agent: http.Agent,
  path: string,
  options: { method?: string; headers?: Record<string, string>; body?: string; host?: string } = {},
): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  const req = http.request({
    agent,
    host: options.host ?? 'api.example.test',
    path,
    method: options.method ?? 'GET',
    headers: options.headers,
  });
  req.end(options.body);
  const [res] = (await once(req, 'response')) as [http.IncomingMessage];
  const chunks: Buffer[] = [];
  for await (const c of res) chunks.push(c as Buffer);
  return { status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(chunks).toString() };
}

function expectNoValue(seen: Buffer[] | string): void {
  const text = typeof seen === 'string' ? seen : Buffer.concat(seen).toString('latin1');
  for (const v of VALUES) expect(text).not.toContain(v);
}

describe('secret broker', () => {
  it('makes placeholders that are stable per seed and name, and differ between names', () => {
    expect(API.placeholder).toMatch(/^aegis-secret-[0-9a-f]{48}$/);
    expect(placeholderFor(SEED, 'API_KEY')).toBe(API.placeholder);
    expect(OTHER.placeholder).not.toBe(API.placeholder);
    expect(placeholderFor(Buffer.alloc(32, 8), 'API_KEY')).not.toBe(API.placeholder);
  });

  it('brokers the bound names and suffixes only, and refuses secrets bound to addresses or carrying control characters', () => {
    const b = broker();
    expect(b.brokers('api.example.test')).toBe(true);
    expect(b.brokers('API.example.test.')).toBe(true);
    expect(b.brokers('other.test')).toBe(true);
    expect(b.brokers('x.other.test')).toBe(true);
    expect(b.brokers('example.test')).toBe(false);
    expect(b.brokers('api.example.test.evil')).toBe(false);
    for (const bad of [
      { ...API, hosts: ['10.0.0.1'] },
      { ...API, hosts: [] },
      { ...API, value: 'a\r\nX-Injected: 1' },
      { ...API, placeholder: 'short' },
    ]) {
      let err: unknown;
      try {
        broker({ secrets: [bad] });
      } catch (e) {
        err = e;
      }
      expect(isAegisError(err) && err.code === 'INVALID_ARGUMENT', JSON.stringify(bad.hosts)).toBe(true);
      expect(String((err as Error).message)).not.toContain('X-Injected');
    }
  });

  it('replaces the placeholder in a header and the URL query over HTTPS, and the guest gets the upstream response', async () => {
    const b = broker();
    const { socket, seen, agent } = await guestTls(b, 'api.example.test');
    expect(socket.alpnProtocol).toBe('http/1.1');
    got.length = 0;
    const res = await send(agent, `/v1/things?key=${API.placeholder}&x=1`, {
      method: 'POST',
      headers: { authorization: `Bearer ${API.placeholder}`, 'content-type': 'text/plain' },
      body: `body keeps ${API.placeholder}`,
    });
    expect(res).toMatchObject({ status: 200, body: 'hello from upstream\n', headers: { 'x-upstream': 'yes' } });
    expect(got).toHaveLength(1);
    const up = got[0] as Seen;
    expect(up.method).toBe('POST');
    expect(up.headers.authorization).toBe(`Bearer ${API.value}`);
    expect(up.headers.host).toBe('api.example.test');
    expect(new URL(up.url, 'https://x').searchParams.get('key')).toBe(API.value);
    expect(up.body).toBe(`body keeps ${API.placeholder}`); // bodies are not rewritten
    expectNoValue(seen);
    socket.destroy();
    b.close();
  });

  it('serves several requests on one kept-alive guest connection, with chunked bodies both ways', async () => {
    const b = broker();
    const { socket, seen, agent } = await guestTls(b, 'api.example.test');
    got.length = 0;
    const one = await send(agent, '/stream', { headers: { 'x-key': API.placeholder } });
    expect(one).toMatchObject({ status: 200, body: 'part one, part two\n', headers: { 'transfer-encoding': 'chunked' } });
    // A request body without a length, written in pieces: streamed through as chunks.
    const req = http.request({ agent, host: 'api.example.test', path: '/two', method: 'POST', headers: { 'x-key': API.placeholder } });
    req.write('first ');
    setTimeout(() => req.end('second'), 20);
    const [res] = (await once(req, 'response')) as [http.IncomingMessage];
    res.resume();
    await once(res, 'end');
    expect(res.statusCode).toBe(200);
    expect(got.map((g) => [g.url, g.headers['x-key'], g.body])).toEqual([
      ['/stream', API.value, ''],
      ['/two', API.value, 'first second'],
    ]);
    expect(got[1]?.headers['transfer-encoding']).toBe('chunked');
    expect(socket.destroyed).toBe(false);
    expectNoValue(seen);
    socket.destroy();
    b.close();
  });

  it('sends the placeholder of a secret bound elsewhere unchanged, and gives no value when Host names another host than the TLS server name', async () => {
    const b = broker();
    const { socket, agent } = await guestTls(b, 'api.example.test');
    got.length = 0;
    await send(agent, '/', { headers: { 'x-other': OTHER.placeholder, 'x-api': API.placeholder } });
    expect(got[0]?.headers['x-other']).toBe(OTHER.placeholder);
    expect(got[0]?.headers['x-api']).toBe(API.value);
    // Domain fronting: the connection is to api.example.test, the request names another host.
    await send(agent, '/', { host: 'x.other.test', headers: { 'x-other': OTHER.placeholder, 'x-api': API.placeholder } });
    expect(got[1]?.headers.host).toBe('x.other.test');
    expect(got[1]?.headers['x-other']).toBe(OTHER.placeholder);
    expect(got[1]?.headers['x-api']).toBe(API.placeholder);
    socket.destroy();
    b.close();
  });

  it('answers 502 naming the reason, without the value, when the upstream certificate does not verify', async () => {
    const b = broker({ upstreamCa: [brokerCa.certPem] }); // not the CA that signed the upstream
    const { socket, seen, agent } = await guestTls(b, 'api.example.test');
    got.length = 0;
    const res = await send(agent, `/?key=${API.placeholder}`, { headers: { authorization: API.placeholder } });
    expect(res.status).toBe(502);
    expect(res.body).toMatch(/^aegis: the certificate of api\.example\.test did not verify \([A-Z_]+\)\n$/);
    expect(got).toHaveLength(0);
    expectNoValue(seen);
    socket.destroy();
    b.close();
  });

  it('verifies upstream against the host roots plus the PEM file AEGIS_EXTRA_CA_CERTS names, by default', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-broker-'));
    const file = path.join(dir, 'extra.pem');
    fs.writeFileSync(file, upstreamCa.certPem);
    const before = process.env.AEGIS_EXTRA_CA_CERTS;
    try {
      process.env.AEGIS_EXTRA_CA_CERTS = file;
      const b = new SecretBroker({ ca: brokerCa, secrets: [API] });
      const { socket, agent } = await guestTls(b, 'api.example.test');
      got.length = 0;
      expect((await send(agent, '/', { headers: { 'x-key': API.placeholder } })).status).toBe(200);
      expect(got[0]?.headers['x-key']).toBe(API.value);
      socket.destroy();
      b.close();
      process.env.AEGIS_EXTRA_CA_CERTS = path.join(dir, 'missing.pem');
      expect(() => new SecretBroker({ ca: brokerCa, secrets: [API] })).toThrow(/AEGIS_EXTRA_CA_CERTS/);
    } finally {
      if (before === undefined) delete process.env.AEGIS_EXTRA_CA_CERTS;
      else process.env.AEGIS_EXTRA_CA_CERTS = before;
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('answers 504 when the upstream accepts but never completes the TLS handshake', async () => {
    const silent = net.createServer(() => {});
    silent.listen(0, '127.0.0.1');
    await once(silent, 'listening');
    const b = broker({ connectTimeoutMs: 200 });
    const [g, h] = duplexPair();
    const socket = tls.connect({ socket: g, servername: 'api.example.test', ca: [brokerCa.certPem] });
    const head = await firstChunk(h);
    b.handle(h, { address: '127.0.0.1', port: (silent.address() as AddressInfo).port }, head, 'api.example.test');
    await once(socket, 'secureConnect');
    const res = await send(agentOver(socket), `/?key=${API.placeholder}`);
    expect(res.status).toBe(504);
    expect(res.body).toBe(`aegis: no connection to api.example.test (127.0.0.1:${(silent.address() as AddressInfo).port}) within 0.2 s\n`);
    socket.destroy();
    b.close();
    silent.close();
  });

  it('never lets the value reach the guest: a 404 and a redirect that repeats the query come back with the placeholder', async () => {
    const b = broker();
    const { socket, seen, agent } = await guestTls(b, 'api.example.test');
    const missing = await send(agent, `/missing?key=${API.placeholder}`, { headers: { authorization: API.placeholder } });
    expect(missing).toMatchObject({ status: 404, body: 'not here\n' });
    const redirect = await send(agent, `/redirect?key=${API.placeholder}`);
    expect(redirect.status).toBe(302);
    expect(redirect.headers.location).toBe(`https://api.example.test/next?key=${API.placeholder}`);
    expectNoValue(seen);
    socket.destroy();
    b.close();
  });

  it('replaces the placeholder in plain HTTP too, and only towards an address the bound name resolves to', async () => {
    const name = 'plain.example.test';
    const secret = { ...API, hosts: [name] };
    const addresses: Record<string, string[]> = { [name]: ['127.0.0.1'] };
    for (const [resolvesTo, expected] of [
      [['127.0.0.1'], secret.value],
      [[], secret.placeholder],
    ] as const) {
      addresses[name] = [...resolvesTo];
      const b = broker({ secrets: [secret], addressesOf: (n) => Promise.resolve(addresses[n] ?? []) });
      const [g, h] = duplexPair();
      const seen: Buffer[] = [];
      g.on('data', (c: Buffer) => seen.push(c));
      const agent = agentOver(g, false);
      got.length = 0;
      const pending = send(agent, `/plain?key=${secret.placeholder}`, { host: name, headers: { 'x-key': secret.placeholder } });
      const head = await firstChunk(h);
      expect(serverName(head)).toEqual({ kind: 'http', name });
      b.handle(h, { address: '127.0.0.1', port: portOf(plain) }, head, name);
      const res = await pending;
      expect(res.status).toBe(200);
      expect(got[0]?.headers['x-key']).toBe(expected);
      expect(new URL(got[0]?.url ?? '', 'http://x').searchParams.get('key')).toBe(expected);
      expectNoValue(seen);
      b.close();
    }
  });

  it('answers pipelined plain HTTP requests in order on one connection', async () => {
    const name = 'plain.example.test';
    const b = broker({ secrets: [{ ...API, hosts: [name] }], addressesOf: () => Promise.resolve(['127.0.0.1']) });
    const [g, h] = duplexPair();
    const chunks: Buffer[] = [];
    g.on('data', (c: Buffer) => chunks.push(c));
    // The last request said Connection: close: the broker ends its side after the answer.
    const ended = once(g, 'end');
    got.length = 0;
    const request = (path: string, last: boolean): string =>
      `GET ${path} HTTP/1.1\r\nHost: ${name}\r\nX-Key: ${API.placeholder}\r\n${last ? 'Connection: close\r\n' : ''}\r\n`;
    g.write(request('/stream', false) + request('/missing', false) + request('/three', true));
    const head = await firstChunk(h);
    b.handle(h, { address: '127.0.0.1', port: portOf(plain) }, head, name);
    await ended;
    const text = Buffer.concat(chunks).toString();
    expect([...text.matchAll(/^HTTP\/1\.1 (\d+)/gm)].map((m) => m[1])).toEqual(['200', '404', '200']);
    expect(text.indexOf('part two')).toBeLessThan(text.indexOf('not here'));
    expect(got.map((x) => x.url).sort()).toEqual(['/missing', '/stream', '/three']);
    expect(got.every((x) => x.headers['x-key'] === API.value)).toBe(true);
    expectNoValue(text);
    b.close();
  });

  it('answers 431 to a request head over 64 KiB', async () => {
    const b = broker();
    const [g, h] = duplexPair();
    const chunks: Buffer[] = [];
    g.on('data', (c: Buffer) => chunks.push(c));
    const closed = once(g, 'close');
    g.write(`GET / HTTP/1.1\r\nHost: api.example.test\r\nX-Big: ${'a'.repeat(70 * 1024)}\r\n\r\n`);
    const head = await firstChunk(h);
    b.handle(h, { address: '127.0.0.1', port: portOf(plain) }, head, 'api.example.test');
    await closed;
    expect(Buffer.concat(chunks).toString()).toMatch(/^HTTP\/1\.1 431 /);
    b.close();
  });

  it('derives the same CA key from the same seed, so a leaf made after a restart verifies against the CA the guest installed', async () => {
    const again = await instanceCa(SEED, 'i-test');
    const first = new x509.X509Certificate(brokerCa.certPem);
    const second = new x509.X509Certificate(again.certPem);
    expect(again.keyPem).toBe(brokerCa.keyPem);
    expect(Buffer.from(second.publicKey.rawData).equals(Buffer.from(first.publicKey.rawData))).toBe(true);
    expect(second.subject).toBe(first.subject);
    expect(first.subject).toBe('CN=Aegis egress CA i-test');
    const other = await instanceCa(Buffer.alloc(32, 8), 'i-test');
    expect(other.keyPem).not.toBe(brokerCa.keyPem);

    // The certificate is a CA for signing certificates, valid from a day ago for about ten years.
    const bc = first.getExtension(x509.BasicConstraintsExtension);
    const ku = first.getExtension(x509.KeyUsagesExtension);
    expect(bc?.ca).toBe(true);
    expect((ku?.usages ?? 0) & x509.KeyUsageFlags.keyCertSign).toBeTruthy();
    expect(Date.now() - first.notBefore.getTime()).toBeGreaterThan(DAY_MS - 60_000);
    expect(first.notAfter.getTime() - Date.now()).toBeGreaterThan(9 * 365 * DAY_MS);

    // The "restarted" broker signs with the derived key; the guest trusts only the first certificate.
    const b = broker({ ca: again });
    const { socket, agent } = await guestTls(b, 'api.example.test', brokerCa.certPem);
    const res = await send(agent, '/');
    expect(res.status).toBe(200);
    socket.destroy();
    b.close();

    await expect(instanceCa(Buffer.alloc(16), 'short')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });
});
