/**
 * The egress policy against real DNS messages (dns-packet on both sides) and real TCP servers
 * on loopback; names resolve through a table (the real-VM tests resolve through a DNS server
 * of their own test internet: tests/integration/network.test.ts).
 */
import net from 'node:net';
import * as dnsPacket from 'dns-packet';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { Egress } from './egress.js';
import { namesExplicitly, parseRule, refusedByDefault } from './rules.js';
import { serverName } from './server-name.js';

const NAMES: Record<string, string[]> = {
  'pypi.org': ['151.101.0.223'],
  'files.pythonhosted.org': ['151.101.1.63'],
  'rebind.example': ['10.1.2.3', '169.254.169.254'],
  'lan.example': ['192.168.1.20'],
  'loop.example': ['127.0.0.1'],
};
const resolve4 = (name: string): Promise<Array<{ address: string; ttl: number }>> => {
  const list = NAMES[name];
  if (!list) return Promise.reject(Object.assign(new Error('not found'), { code: 'ENOTFOUND' }));
  return Promise.resolve(list.map((address) => ({ address, ttl: 30 })));
};

async function ask(e: Egress, name: string, type: 'A' | 'AAAA' = 'A'): Promise<{ rcode: string; addresses: string[] }> {
  const q = dnsPacket.encode({
    type: 'query',
    id: 42,
    flags: dnsPacket.RECURSION_DESIRED,
    questions: [{ type, name }],
  } as dnsPacket.Packet);
  const a = dnsPacket.decode((await e.dns(q)) as Buffer);
  expect(a.id).toBe(42);
  const rcode = (a as { rcode?: string }).rcode ?? '';
  return { rcode, addresses: (a.answers ?? []).map((x) => String((x as { data?: unknown }).data)) };
}

describe('egress rules', () => {
  it('parses names, suffixes, addresses and CIDRs with ports, and refuses the rest with INVALID_ARGUMENT', () => {
    expect(parseRule('PyPI.org').target).toEqual({ kind: 'name', name: 'pypi.org' });
    expect(parseRule('*.pythonhosted.org:443')).toMatchObject({ target: { kind: 'suffix', suffix: 'pythonhosted.org' }, port: 443 });
    expect(parseRule('10.0.0.0/8:8080')).toMatchObject({ target: { kind: 'address', network: '10.0.0.0', prefix: 8 }, port: 8080 });
    expect(parseRule('[fd00::1]:443')).toMatchObject({ target: { kind: 'address', family: 'ipv6', prefix: 128 }, port: 443 });
    for (const bad of ['', 'a b', 'x.org:0', 'x.org:70000', '10.0.0.0/33', '*.', 'bad_/8', 'a..b']) {
      let err: unknown;
      try {
        parseRule(bad);
      } catch (e) {
        err = e;
      }
      expect(isAegisError(err) && err.code === 'INVALID_ARGUMENT', bad).toBe(true);
    }
  });

  it('refuses loopback, private, CGNAT, link-local, ULA, multicast and mapped addresses by default; public ones pass', () => {
    for (const a of [
      '127.0.0.1',
      '10.9.9.9',
      '172.20.0.1',
      '192.168.0.1',
      '100.64.1.1',
      '169.254.169.254',
      'fe80::1',
      'fd12::1',
      '224.0.0.251',
      '::1',
      '::ffff:10.0.0.1',
    ]) {
      expect(refusedByDefault(a), a).toBeDefined();
    }
    for (const a of ['151.101.0.223', '8.8.8.8', '2606:4700::1111']) expect(refusedByDefault(a), a).toBeUndefined();
  });

  it('an address rule names a private address explicitly only if it lies within its range: 0.0.0.0/0 does not unlock the LAN', () => {
    expect(namesExplicitly(parseRule('192.168.1.20'), '192.168.1.20')).toBe(true);
    expect(namesExplicitly(parseRule('192.168.1.0/24'), '192.168.1.20')).toBe(true);
    expect(namesExplicitly(parseRule('0.0.0.0/0'), '192.168.1.20')).toBe(false);
    expect(namesExplicitly(parseRule('0.0.0.0/0'), '8.8.8.8')).toBe(true);
  });
});

describe('server names in first bytes', () => {
  it('finds the SNI of a real ClientHello and the Host of an HTTP request; asks for more when cut short', async () => {
    const hello = await new Promise<Buffer>((resolve) => {
      const srv = net.createServer((s) => s.once('data', (d: Buffer) => (resolve(d), s.destroy(), srv.close())));
      srv.listen(0, '127.0.0.1', () => {
        void import('node:tls').then((tls) => {
          const port = (srv.address() as net.AddressInfo).port;
          tls.connect({ host: '127.0.0.1', port, servername: 'api.example.com', rejectUnauthorized: false }).on('error', () => undefined);
        });
      });
    });
    expect(serverName(hello)).toEqual({ kind: 'tls', name: 'api.example.com' });
    expect(serverName(hello.subarray(0, 20))).toEqual({ kind: 'more' });
    expect(serverName(Buffer.from('GET /x HTTP/1.1\r\nHost: Pypi.org:8080\r\n\r\n'))).toEqual({ kind: 'http', name: 'pypi.org' });
    expect(serverName(Buffer.from('GET /x HTTP/1.1\r\nHost: pypi'))).toEqual({ kind: 'more' });
    expect(serverName(Buffer.from('SSH-2.0-OpenSSH_9.2\r\n'))).toEqual({ kind: 'other' });
  });
});

describe('Egress', () => {
  let server: net.Server;
  let port = 0;
  beforeAll(async () => {
    server = net.createServer((s) => s.on('data', (d) => s.write(d)));
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    port = (server.address() as net.AddressInfo).port;
  });
  afterAll(() => server.close());

  it('by default: public names resolve; rebinding and private answers are NXDOMAIN; AAAA is empty', async () => {
    const e = new Egress({ allow: [], deny: [] }, { resolve4 });
    expect(await ask(e, 'pypi.org')).toEqual({ rcode: 'NOERROR', addresses: ['151.101.0.223'] });
    expect(await ask(e, 'rebind.example')).toEqual({ rcode: 'NXDOMAIN', addresses: [] });
    expect(await ask(e, 'nowhere.example')).toEqual({ rcode: 'NXDOMAIN', addresses: [] });
    expect(await ask(e, 'pypi.org', 'AAAA')).toEqual({ rcode: 'NOERROR', addresses: [] });
    expect(await e.connect({ address: '127.0.0.1', port })).toBeUndefined();
    expect(await e.connect({ address: '169.254.169.254', port: 80 })).toBeUndefined();
    const log = e.view(true).log ?? [];
    expect(log.filter((d) => !d.allowed).map((d) => d.reason)).toEqual([
      'answers refused: link-local (cloud metadata lives here) address',
      'loopback address',
      'link-local (cloud metadata lives here) address',
    ]);
  });

  it('an explicitly allowed address (even loopback) is reached; bytes are counted per destination', async () => {
    const e = new Egress({ allow: ['127.0.0.1'], deny: [] }, { resolve4 });
    const conn = await e.connect({ address: '127.0.0.1', port });
    expect(conn).toBeDefined();
    const socket = conn?.socket as net.Socket;
    socket.write('ping');
    await new Promise((r) => socket.once('data', r));
    socket.destroy();
    await new Promise((r) => setTimeout(r, 20));
    expect(e.view(false).counters).toContainEqual({ destination: `127.0.0.1:${port}`, allowed: 1, denied: 0, bytesOut: 4, bytesIn: 4 });
  });

  it('allow list by name: only its answers are reachable, with the server name checked; deny wins; rules change live', async () => {
    const e = new Egress({ allow: ['*.pythonhosted.org', 'loop.example'], deny: [] }, { resolve4 });
    expect((await ask(e, 'pypi.org')).rcode).toBe('NXDOMAIN');
    expect(await ask(e, 'files.pythonhosted.org')).toEqual({ rcode: 'NOERROR', addresses: ['151.101.1.63'] });
    // A name the user allowed may answer with a private address (it was named).
    expect(await ask(e, 'loop.example')).toEqual({ rcode: 'NOERROR', addresses: ['127.0.0.1'] });
    const conn = await e.connect({ address: '127.0.0.1', port });
    expect(conn?.inspect).toBeDefined();
    expect(conn?.inspect?.(Buffer.from('GET / HTTP/1.1\r\nHost: loop.example\r\n\r\n'), false)).toBe('ok');
    conn?.socket.destroy();
    const other = await e.connect({ address: '127.0.0.1', port });
    expect(other?.inspect?.(Buffer.from('GET / HTTP/1.1\r\nHost: evil.example\r\n\r\n'), false)).toEqual({
      deny: 'HTTP Host evil.example is not in the allow list',
    });
    other?.socket.destroy();
    // Raw addresses nobody's answer gave are refused.
    expect(await e.connect({ address: '151.101.0.223', port: 443 })).toBeUndefined();
    e.update({ deny: ['loop.example'] });
    expect((await ask(e, 'loop.example')).rcode).toBe('NXDOMAIN');
    expect(await e.connect({ address: '127.0.0.1', port })).toBeUndefined();
    expect(e.view(false)).toMatchObject({ mode: 'allow-list', allow: ['*.pythonhosted.org', 'loop.example'], deny: ['loop.example'] });
  });

  it('keeps its log and counters bounded whatever a guest asks', async () => {
    const e = new Egress({ allow: [], deny: [] }, { resolve4 });
    for (let i = 0; i < 1500; i++) await e.connect({ address: `10.0.${i >> 8}.${i & 255}`, port: 80 });
    const v = e.view(true);
    expect(v.log).toHaveLength(1000);
    expect(v.counters.length).toBeLessThanOrEqual(513);
    expect(v.counters.find((c) => c.destination === '(other destinations)')?.denied).toBe(1500 - 512);
  });
});
