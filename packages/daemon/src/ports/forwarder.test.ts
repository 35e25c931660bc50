/**
 * The listeners' lifetime. Forwarding itself (the data channel) is data-channel.test.ts; here
 * `connect` only records that a connection was accepted and handed on.
 */
import net from 'node:net';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { PortForwarder, type DataStreams } from './forwarder.js';

const cleanups: (() => void)[] = [];
afterEach(() => {
  for (const c of cleanups.splice(0)) c();
  vi.restoreAllMocks();
});

/** Listens on one free loopback port, keeping hold of the server the forwarder created for it. */
async function listenOne(): Promise<{ forwarder: PortForwarder; server: net.Server; port: number }> {
  const createServer = vi.spyOn(net, 'createServer');
  const forwarder = await PortForwarder.listen([{ guestPort: 80, hostPort: 0, hostIp: '127.0.0.1', protocol: 'tcp' }]);
  cleanups.push(() => forwarder.close());
  const server = createServer.mock.results[0]?.value as net.Server | undefined;
  if (!server) throw new Error('PortForwarder.listen created no server');
  const port = forwarder.mappings[0]?.hostPort ?? 0;
  return { forwarder, server, port };
}

function acceptError(): NodeJS.ErrnoException {
  return Object.assign(new Error('accept EMFILE'), { code: 'EMFILE', errno: -24, syscall: 'accept' });
}

/** Connects to the port and resolves once the forwarder asked for a data channel for it. */
async function connectThrough(port: number, connect: ReturnType<typeof vi.fn>): Promise<void> {
  const calls = connect.mock.calls.length;
  const client = net.connect(port, '127.0.0.1');
  client.on('error', () => undefined);
  cleanups.push(() => client.destroy());
  await vi.waitFor(() => expect(connect.mock.calls.length).toBeGreaterThan(calls));
}

describe('PortForwarder listeners', () => {
  it('survives an error on a listening port (accept failing with EMFILE) instead of crashing the daemon, and keeps accepting', async () => {
    const { forwarder, server, port } = await listenOne();
    const connect = vi.fn((): Promise<DataStreams> => Promise.reject(new Error('no VM in this test')));
    const onError = vi.fn();
    forwarder.serve(connect, onError);

    // Twice: a leftover one-shot handler from listen() would swallow only the first. With no
    // 'error' listener EventEmitter throws, which in aegisd is an uncaught exception.
    const errs = [acceptError(), acceptError()];
    for (const err of errs) expect(() => server.emit('error', err)).not.toThrow();
    expect(onError.mock.calls).toEqual(errs.map((err) => [err]));
    expect(server.listening).toBe(true);
    await connectThrough(port, connect);
  });

  it('survives a listener error before serve() and without an onError callback', async () => {
    const { forwarder, server, port } = await listenOne();
    expect(() => server.emit('error', acceptError())).not.toThrow();
    expect(() => server.emit('error', acceptError())).not.toThrow();
    const connect = vi.fn((): Promise<DataStreams> => Promise.reject(new Error('no VM in this test')));
    forwarder.serve(connect);
    expect(() => server.emit('error', acceptError())).not.toThrow();
    await connectThrough(port, connect);
  });

  it('still fails the whole listen with ALREADY_EXISTS when a host port is taken', async () => {
    const { port } = await listenOne();
    await expect(
      PortForwarder.listen([
        { guestPort: 81, hostPort: 0, hostIp: '127.0.0.1', protocol: 'tcp' },
        { guestPort: 80, hostPort: port, hostIp: '127.0.0.1', protocol: 'tcp' },
      ]),
    ).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
  });
});
