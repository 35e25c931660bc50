import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { connectVsock } from './vsock.js';

/** The host end of a Firecracker vsock device: reads `CONNECT <port>\n`, then does what `answer` says. */
function stubUds(socketPath: string, answer: (port: string, socket: net.Socket) => void): Promise<net.Server> {
  const server = net.createServer((socket) => {
    let buf = '';
    const onData = (c: Buffer): void => {
      buf += c.toString('latin1');
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      socket.removeListener('data', onData);
      const m = /^CONNECT (\d+)$/.exec(buf.slice(0, nl));
      if (!m?.[1]) return void socket.destroy();
      answer(m[1], socket);
    };
    socket.on('data', onData);
    socket.on('error', () => undefined);
  });
  return new Promise((resolve) => server.listen(socketPath, () => resolve(server)));
}

/** Everything the stream delivers until `n` bytes have arrived, read the way the daemon reads. */
function collect(stream: Duplex, n: number): Promise<string> {
  return new Promise((resolve) => {
    let got = '';
    stream.on('data', (c: Buffer) => {
      got += c.toString('utf8');
      if (got.length >= n) resolve(got);
    });
  });
}

let dir: string;
let server: net.Server | undefined;
let uds: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-fcvsock-'));
  uds = path.join(dir, 'vsock.sock');
});

afterEach(async () => {
  if (server) await new Promise<void>((resolve) => server?.close(() => resolve()));
  server = undefined;
  fs.rmSync(dir, { recursive: true, force: true });
});

async function failure(p: Promise<unknown>): Promise<AegisError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(AegisError);
  return err as AegisError;
}

describe('connectVsock', () => {
  it('sends CONNECT <port> and keeps bytes that arrive in the same chunk as the OK line', async () => {
    const seen: string[] = [];
    server = await stubUds(uds, (port, socket) => {
      seen.push(port);
      socket.write(`OK 1073741824\n{"hello":${port}}\n`);
      socket.on('data', (c: Buffer) => socket.write(c));
    });
    const stream = await connectVsock(uds, 1024);
    const first = collect(stream, '{"hello":1024}\n'.length + 'ping\n'.length);
    stream.write('ping\n');
    expect(await first).toBe('{"hello":1024}\nping\n');
    expect(seen).toEqual(['1024']);
    stream.destroy();
  });

  it('reads an OK line split across chunks, and loses nothing that follows', async () => {
    server = await stubUds(uds, (_port, socket) => {
      socket.write('OK 10');
      setTimeout(() => socket.write('73741825\nda'), 10);
      setTimeout(() => socket.write('ta\n'), 20);
    });
    const stream = await connectVsock(uds, 1025);
    expect(await collect(stream, 5)).toBe('data\n');
    stream.destroy();
  });

  it('fails with UNAVAILABLE when Firecracker closes the connection (nothing listens on the port)', async () => {
    server = await stubUds(uds, (_port, socket) => socket.destroy());
    const err = await failure(connectVsock(uds, 1024));
    expect(err.code).toBe('UNAVAILABLE');
    expect(err.message).toContain('is the guest listening on port 1024');
  });

  it('fails with UNAVAILABLE on an answer that is not OK', async () => {
    server = await stubUds(uds, (_port, socket) => socket.write('NOPE\n'));
    const err = await failure(connectVsock(uds, 1024));
    expect(err.code).toBe('UNAVAILABLE');
    expect(err.message).toContain('unexpected handshake answer "NOPE"');
  });

  it('fails with UNAVAILABLE when the socket does not exist', async () => {
    expect((await failure(connectVsock(uds, 1024))).code).toBe('UNAVAILABLE');
  });

  it('fails with UNAVAILABLE when no answer comes in time, and CANCELLED on abort', async () => {
    server = await stubUds(uds, () => undefined);
    expect((await failure(connectVsock(uds, 1024, { timeoutMs: 50 }))).code).toBe('UNAVAILABLE');
    const ctl = new AbortController();
    const p = connectVsock(uds, 1024, { signal: ctl.signal });
    setTimeout(() => ctl.abort(), 20);
    expect((await failure(p)).code).toBe('CANCELLED');
  });
});
