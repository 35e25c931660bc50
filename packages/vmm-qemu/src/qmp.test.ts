import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { QmpClient, type QmpEvent } from './qmp.js';

const GREETING = '{"QMP":{"version":{},"capabilities":[]}}\n';

interface StubOptions {
  /** Do not send the greeting on connect. */
  silent?: boolean;
  /** Answer qmp_capabilities with an error. */
  refuseCapabilities?: boolean;
}

/** A QMP server that answers like QEMU for a handful of commands; `hang` is never answered. */
class StubQmp {
  readonly server: net.Server;
  readonly sockets = new Set<net.Socket>();
  /** Every command received, in order, across connections. */
  readonly received: Record<string, unknown>[] = [];
  connections = 0;

  constructor(
    readonly socketPath: string,
    readonly options: StubOptions = {},
  ) {
    this.server = net.createServer((socket) => this.accept(socket));
  }

  listen(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(this.socketPath, () => resolve());
    });
  }

  /** Sends a raw line to every connected client. */
  push(text: string): void {
    for (const s of this.sockets) s.write(text);
  }

  event(event: string, data?: Record<string, unknown>): void {
    this.push(JSON.stringify(data ? { event, data, timestamp: { seconds: 1, microseconds: 2 } } : { event }) + '\n');
  }

  /** Drops every client connection, as QEMU does when it exits. */
  disconnectAll(): void {
    for (const s of this.sockets) s.destroy();
  }

  async close(): Promise<void> {
    this.disconnectAll();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }

  private accept(socket: net.Socket): void {
    this.connections++;
    this.sockets.add(socket);
    socket.on('close', () => this.sockets.delete(socket));
    socket.on('error', () => undefined);
    if (!this.options.silent) socket.write(GREETING);
    let buffered = '';
    socket.on('data', (chunk: Buffer) => {
      buffered += chunk.toString('utf8');
      let nl: number;
      while ((nl = buffered.indexOf('\n')) !== -1) {
        const line = buffered.slice(0, nl);
        buffered = buffered.slice(nl + 1);
        this.answer(socket, JSON.parse(line) as Record<string, unknown>);
      }
    });
  }

  private answer(socket: net.Socket, msg: Record<string, unknown>): void {
    this.received.push(msg);
    const reply = (o: unknown): boolean => socket.write(JSON.stringify(o) + '\n');
    switch (msg['execute']) {
      case 'qmp_capabilities':
        if (this.options.refuseCapabilities) reply({ error: { class: 'GenericError', desc: 'capabilities refused' } });
        else reply({ return: {} });
        return;
      case 'query-status':
        reply({ return: { status: 'running' } });
        return;
      case 'echo-args':
        reply({ return: msg['arguments'] ?? null });
        return;
      case 'hang':
        return;
      default:
        reply({ error: { class: 'CommandNotFound', desc: `The command ${String(msg['execute'])} has not been found` } });
    }
  }
}

function rejectionOf(p: Promise<unknown>): Promise<AegisError> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (err: unknown) => {
      expect(err).toBeInstanceOf(AegisError);
      return err as AegisError;
    },
  );
}

describe('QmpClient', () => {
  let dir: string;
  let socketPath: string;
  const stubs: StubQmp[] = [];
  const clients: QmpClient[] = [];

  function stub(options?: StubOptions): StubQmp {
    const s = new StubQmp(socketPath, options);
    stubs.push(s);
    return s;
  }

  async function connect(timeoutMs = 2000): Promise<QmpClient> {
    const c = await QmpClient.connect(socketPath, { timeoutMs });
    clients.push(c);
    return c;
  }

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-qmp-test-'));
    socketPath = path.join(dir, 'qmp.sock');
  });

  afterEach(async () => {
    for (const c of clients.splice(0)) c.close();
    for (const s of stubs.splice(0)) await s.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('connect', () => {
    it('reads the greeting and negotiates capabilities before anything else', async () => {
      const s = stub();
      await s.listen();
      const c = await connect();
      expect(c.isClosed).toBe(false);
      expect(s.received).toEqual([{ execute: 'qmp_capabilities' }]);
    });

    it('retries while the socket does not exist yet, and connects once it appears', async () => {
      const s = stub();
      const started = Date.now();
      const timer = setTimeout(() => void s.listen(), 100);
      try {
        const c = await connect(3000);
        expect(Date.now() - started).toBeGreaterThanOrEqual(90);
        expect(await c.execute('query-status')).toEqual({ status: 'running' });
        expect(s.connections).toBe(1);
      } finally {
        clearTimeout(timer);
      }
    });

    it('gives up with UNAVAILABLE, naming the socket, when nothing listens before the deadline', async () => {
      const started = Date.now();
      const err = await rejectionOf(QmpClient.connect(socketPath, { timeoutMs: 100 }));
      expect(err.code).toBe('UNAVAILABLE');
      expect(err.message).toContain(socketPath);
      expect(Date.now() - started).toBeLessThan(2000);
    });

    it('stops retrying when its signal is aborted', async () => {
      const ac = new AbortController();
      const p = QmpClient.connect(socketPath, { timeoutMs: 10_000, signal: ac.signal });
      setTimeout(() => ac.abort(new Error('stop waiting')), 50);
      await expect(p).rejects.toThrow('stop waiting');
    });

    it('fails with UNAVAILABLE when QEMU keeps refusing capability negotiation', async () => {
      const s = stub({ refuseCapabilities: true });
      await s.listen();
      const err = await rejectionOf(QmpClient.connect(socketPath, { timeoutMs: 100 }));
      expect(err.code).toBe('UNAVAILABLE');
      expect(err.message).toContain(socketPath);
      expect(s.received.length).toBeGreaterThan(0);
      expect(s.received.every((m) => m['execute'] === 'qmp_capabilities')).toBe(true);
    });

    it('gives up with UNAVAILABLE when the server accepts but never sends the greeting', async () => {
      const s = stub({ silent: true });
      await s.listen();
      const started = Date.now();
      const outcome = await Promise.race([
        QmpClient.connect(socketPath, { timeoutMs: 100 }).then(
          (c) => {
            clients.push(c);
            return 'connected';
          },
          (err: unknown) => (err instanceof AegisError ? err.code : 'other error'),
        ),
        new Promise<string>((r) => setTimeout(() => r('still waiting'), 2000)),
      ]);
      expect(outcome).toBe('UNAVAILABLE');
      expect(Date.now() - started).toBeLessThan(1000);
      expect(s.received).toEqual([]);
    });

    it('closes the connection it gave up on when the greeting never came', async () => {
      const s = stub({ silent: true });
      await s.listen();
      await rejectionOf(QmpClient.connect(socketPath, { timeoutMs: 100 }));
      await expect.poll(() => s.sockets.size).toBe(0);
    });

    // Regression: an attempt that connected but then failed (capabilities refused) used to be
    // retried without closing its socket, leaking a connection per retry.
    it('closes the connection of every attempt that failed', async () => {
      const s = stub({ refuseCapabilities: true });
      await s.listen();
      await rejectionOf(QmpClient.connect(socketPath, { timeoutMs: 100 }));
      await new Promise((r) => setTimeout(r, 50));
      expect(s.connections).toBeGreaterThan(1);
      expect(s.sockets.size).toBe(0);
    });
  });

  describe('execute', () => {
    let s: StubQmp;
    let c: QmpClient;

    beforeEach(async () => {
      s = stub();
      await s.listen();
      c = await connect();
    });

    it('returns the command’s return value', async () => {
      expect(await c.execute('query-status')).toEqual({ status: 'running' });
    });

    it('sends arguments only when given', async () => {
      expect(await c.execute('echo-args', { device: 'disk0', force: true })).toEqual({ device: 'disk0', force: true });
      expect(await c.execute('echo-args')).toBeNull();
      expect(s.received.slice(1)).toEqual([
        { execute: 'echo-args', arguments: { device: 'disk0', force: true } },
        { execute: 'echo-args' },
      ]);
    });

    it('turns a QMP error into an INTERNAL AegisError naming the command and the error class', async () => {
      const err = await rejectionOf(c.execute('no-such-command'));
      expect(err.code).toBe('INTERNAL');
      expect(err.message).toContain('no-such-command');
      expect(err.message).toContain('CommandNotFound');
      expect(err.message).toContain('has not been found');
    });

    it('stays usable after a command fails', async () => {
      await rejectionOf(c.execute('no-such-command'));
      expect(await c.execute('query-status')).toEqual({ status: 'running' });
    });

    it('matches concurrent commands to their replies in order', async () => {
      const results = await Promise.allSettled([c.execute('query-status'), c.execute('no-such-command'), c.execute('echo-args', { n: 3 })]);
      expect(results[0]).toEqual({ status: 'fulfilled', value: { status: 'running' } });
      expect(results[1]?.status).toBe('rejected');
      expect(results[2]).toEqual({ status: 'fulfilled', value: { n: 3 } });
    });

    it('reassembles a reply split across several packets', async () => {
      const p = c.execute('hang');
      await expect.poll(() => s.received.length).toBe(2);
      const reply = '{"return":{"status":"paused"}}\n';
      s.push(reply.slice(0, 5));
      await new Promise((r) => setTimeout(r, 10));
      s.push(reply.slice(5));
      expect(await p).toEqual({ status: 'paused' });
    });

    it('ignores lines that are not JSON', async () => {
      const p = c.execute('hang');
      await expect.poll(() => s.received.length).toBe(2);
      s.push('garbage\n{"return":7}\n');
      expect(await p).toBe(7);
    });
  });

  describe('events', () => {
    let s: StubQmp;
    let c: QmpClient;

    beforeEach(async () => {
      s = stub();
      await s.listen();
      c = await connect();
    });

    it('emits an asynchronous event with its name and data', async () => {
      const got = new Promise<QmpEvent>((resolve) => c.once('event', resolve));
      s.push('{"event":"SHUTDOWN","data":{"guest":true,"reason":"guest-reset"}}\n');
      const ev = await got;
      expect(ev.event).toBe('SHUTDOWN');
      expect(ev.data).toEqual({ guest: true, reason: 'guest-reset' });
    });

    it('does not take an event that arrives before a reply for that reply', async () => {
      const events: QmpEvent[] = [];
      c.on('event', (e) => events.push(e));
      const p = c.execute('hang');
      await expect.poll(() => s.received.length).toBe(2);
      s.push('{"event":"STOP"}\n{"return":{"status":"paused"}}\n{"event":"RESUME"}\n');
      expect(await p).toEqual({ status: 'paused' });
      await expect.poll(() => events.map((e) => e.event)).toEqual(['STOP', 'RESUME']);
    });

    it('emits events that arrive with no command outstanding', async () => {
      const events: string[] = [];
      c.on('event', (e) => events.push(e.event));
      s.event('POWERDOWN');
      s.event('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
      await expect.poll(() => events).toEqual(['POWERDOWN', 'SHUTDOWN']);
      expect(await c.execute('query-status')).toEqual({ status: 'running' });
    });
  });

  describe('closing', () => {
    let s: StubQmp;
    let c: QmpClient;

    beforeEach(async () => {
      s = stub();
      await s.listen();
      c = await connect();
    });

    it('rejects pending commands with UNAVAILABLE when the server closes the connection', async () => {
      const closed = new Promise<void>((resolve) => c.once('close', resolve));
      const first = rejectionOf(c.execute('hang'));
      const second = rejectionOf(c.execute('hang'));
      await expect.poll(() => s.received.length).toBe(3);
      s.disconnectAll();
      expect((await first).code).toBe('UNAVAILABLE');
      expect((await second).code).toBe('UNAVAILABLE');
      await closed;
      expect(c.isClosed).toBe(true);
    });

    it('refuses new commands with UNAVAILABLE once closed', async () => {
      const closed = new Promise<void>((resolve) => c.once('close', resolve));
      s.disconnectAll();
      await closed;
      const err = await rejectionOf(c.execute('query-status'));
      expect(err.code).toBe('UNAVAILABLE');
    });

    it('rejects pending commands with UNAVAILABLE when the client closes itself', async () => {
      const pending = rejectionOf(c.execute('hang'));
      c.close();
      expect((await pending).code).toBe('UNAVAILABLE');
      await expect.poll(() => c.isClosed).toBe(true);
    });
  });
});
