/**
 * The host end of the data channel against a scripted guest end (the real guest end is
 * aegis-init's C, exercised by the real-VM tests in tests/integration/expose.test.ts). Real
 * sockets on both sides: a TCP client as the user, a unix socket pair as the channel.
 */
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { mkdtempSync, rmSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import {
  encodeFrame,
  frameHeader,
  FrameDecoder,
  FrameType,
  GUEST_IDS,
  HEADER_BYTES,
  LINK_ETHERTYPE,
  LINK_MTU,
  LINK_OFFER,
  LINK_SWITCHED,
  LINK_WINDOW_BYTES,
  MAX_PAYLOAD,
  WINDOW_BYTES,
  type Frame,
} from '@aegis/protocol';
import type { Logger } from '../log.js';
import { DataChannel, type DataChannelOptions } from './data-channel.js';
import { duplexPair } from './duplex-pair.js';

interface Rig {
  channel: DataChannel;
  /** The host's end of the channel, as the DataChannel reads it. */
  hostEnd: net.Socket;
  /** The guest's end of the channel. */
  guest: net.Socket;
  frames: Frame[];
  /** What the channel logged. */
  logged: string[];
  /** The user's TCP connection, and the host socket aegisd accepted for it. */
  client: net.Socket;
  accepted: net.Socket;
  close(): void;
}

const rigs: Rig[] = [];
afterEach(() => {
  for (const r of rigs.splice(0)) r.close();
});

async function rig(options: DataChannelOptions = {}): Promise<Rig> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-dc-'));
  const sock = path.join(dir, 'data.sock');
  const guestSide = new Promise<net.Socket>((resolve) => {
    const srv = net.createServer((s) => {
      srv.close();
      resolve(s);
    });
    srv.listen(sock);
  });
  await new Promise((r) => setTimeout(r, 10));
  const hostEnd = net.connect(sock);
  const guest = await guestSide;
  guest.on('error', () => undefined); // a flooding guest meets a closed channel
  const logged: string[] = [];
  const log: Logger = { info: (m) => logged.push(m), warn: (m) => logged.push(m) };
  const channel = new DataChannel(hostEnd, { log, ...options });
  const frames: Frame[] = [];
  const decoder = new FrameDecoder();
  guest.on('data', (c: Buffer) => frames.push(...decoder.push(c)));
  const tcp = net.createServer({ pauseOnConnect: true });
  await new Promise<void>((r) => tcp.listen(0, '127.0.0.1', r));
  const acceptedP = new Promise<net.Socket>((r) => tcp.once('connection', r));
  const client = net.connect((tcp.address() as net.AddressInfo).port, '127.0.0.1');
  const accepted = await acceptedP;
  tcp.close();
  const r: Rig = {
    channel,
    hostEnd,
    guest,
    frames,
    logged,
    client,
    accepted,
    close: () => {
      client.destroy();
      channel.close();
      guest.destroy();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  rigs.push(r);
  return r;
}

async function until(cond: () => boolean, what: string, timeoutMs = 2000): Promise<void> {
  for (let i = 0; i < timeoutMs / 10; i++) {
    if (cond()) return;
    await new Promise((r) => setTimeout(r, 10));
  }
  throw new Error(`timed out waiting for ${what}`);
}

const dataBytes = (frames: Frame[]): number => frames.filter((f) => f.type === FrameType.DATA).reduce((n, f) => n + f.payload.length, 0);

describe('DataChannel', () => {
  it('opens, carries bytes both ways with acknowledgements, and half-closes each way', async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 8080);
    await until(() => r.frames.length >= 1, 'OPEN');
    const open = r.frames[0] as Frame;
    expect(open.type).toBe(FrameType.OPEN);
    expect(open.payload.readUInt16BE(0)).toBe(8080);
    // Nothing is read from the user's socket before the guest side is connected.
    r.client.write('hello');
    await new Promise((res) => setTimeout(res, 50));
    expect(dataBytes(r.frames)).toBe(0);
    r.guest.write(encodeFrame(open.connId, FrameType.OPENED));
    await until(() => dataBytes(r.frames) === 5, 'DATA hello');

    const got: Buffer[] = [];
    r.client.on('data', (c: Buffer) => got.push(c));
    r.guest.write(encodeFrame(open.connId, FrameType.DATA, Buffer.from('world')));
    await until(() => Buffer.concat(got).toString() === 'world', 'world at the client');
    await until(() => r.frames.some((f) => f.type === FrameType.ACK && f.payload.readUInt32BE(0) === 5), 'ACK 5');

    const ended = new Promise((res) => r.client.once('end', res));
    r.guest.write(encodeFrame(open.connId, FrameType.FIN));
    await ended;
    r.client.end();
    await until(() => r.frames.some((f) => f.type === FrameType.FIN), 'FIN from the host');
    expect(r.frames.some((f) => f.type === FrameType.RST)).toBe(false);
  });

  it('stops reading the user while a window of bytes is unacknowledged, and goes on after ACKs', async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.length >= 1, 'OPEN');
    const id = (r.frames[0] as Frame).connId;
    r.guest.write(encodeFrame(id, FrameType.OPENED));
    const total = 4 * WINDOW_BYTES;
    r.client.write(Buffer.alloc(total, 7));
    await until(() => dataBytes(r.frames) >= WINDOW_BYTES, 'a window of data');
    await new Promise((res) => setTimeout(res, 100));
    const sent = dataBytes(r.frames);
    // One read may overshoot the window by its size, never by more.
    expect(sent).toBeLessThanOrEqual(WINDOW_BYTES + 256 * 1024);
    expect(sent).toBeLessThan(total);
    const ack = Buffer.alloc(4);
    ack.writeUInt32BE(sent);
    r.guest.write(encodeFrame(id, FrameType.ACK, ack));
    await until(() => dataBytes(r.frames) > sent, 'more data after the ACK');
  });

  it('closes the user connection on RST, ignores unknown connections, and ends everything on a corrupt stream', async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.length >= 1, 'OPEN');
    const id = (r.frames[0] as Frame).connId;
    const closed = new Promise((res) => r.client.once('close', res));
    r.guest.write(encodeFrame(id + 99, FrameType.DATA, Buffer.from('stray')));
    r.guest.write(encodeFrame(id, FrameType.RST));
    await closed;
    expect(r.channel.isClosed).toBe(false);

    const r2 = await rig();
    r2.channel.forward(r2.accepted, 80);
    await until(() => r2.frames.length >= 1, 'OPEN');
    const closed2 = new Promise((res) => r2.client.once('close', res));
    const bad = Buffer.alloc(9);
    bad.writeUInt32BE(0xffffffff, 5); // a length no frame may have
    r2.guest.write(bad);
    await closed2;
    expect(r2.channel.isClosed).toBe(true);
  });

  it("the host trusts the guest's flow control: a guest that floods DATA without waiting for ACKs makes it hold at most a window, then the channel closes with one logged violation", async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.length >= 1, 'OPEN');
    const id = (r.frames[0] as Frame).connId;
    r.client.pause(); // the user reads nothing: the host socket's buffers fill, then it pushes back
    let peak = 0;
    r.hostEnd.on('data', () => {
      // After each chunk the channel has handled (its listener runs first).
      peak = Math.max(peak, r.channel.bufferedBytes, r.accepted.writableLength);
    });
    r.guest.write(encodeFrame(id, FrameType.OPENED));
    // 128 MiB, far more than the socket buffers between the host and the client can take.
    const payload = Buffer.alloc(MAX_PAYLOAD, 0x61);
    for (let i = 0; i < 512 && !r.guest.destroyed; i++) {
      r.guest.write(frameHeader(id, FrameType.DATA, payload.length));
      r.guest.write(payload);
    }
    await until(() => r.channel.isClosed, 'the channel to close', 20_000);
    expect(r.accepted.destroyed).toBe(true);
    expect(peak).toBeGreaterThan(0);
    expect(peak).toBeLessThanOrEqual(WINDOW_BYTES + HEADER_BYTES + MAX_PAYLOAD);
    expect(r.channel.bufferedBytes).toBe(0);
    expect(r.logged).toHaveLength(1);
    expect(r.logged[0]).toMatch(/broke the data channel protocol \(DATA for connection \d+ past its window/);
  }, 30_000);

  it('a slow client slows the guest: the host stops ACKing while the client socket pushes back, and goes on after drain', async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.length >= 1, 'OPEN');
    const id = (r.frames[0] as Frame).connId;
    r.client.pause();
    // A guest that keeps to the window: sends while less than WINDOW_BYTES are unacknowledged.
    const total = 64 * 1024 * 1024;
    const chunk = 60_000;
    let sent = 0;
    let acked = 0;
    const pump = (): void => {
      while (sent < total && sent - acked + chunk <= WINDOW_BYTES) {
        const n = Math.min(chunk, total - sent);
        r.guest.write(encodeFrame(id, FrameType.DATA, Buffer.alloc(n, (sent / chunk) % 251)));
        sent += n;
      }
    };
    let seen = 0;
    r.guest.on('data', () => {
      for (; seen < r.frames.length; seen++) {
        const f = r.frames[seen] as Frame;
        if (f.type === FrameType.ACK && f.connId === id) acked += f.payload.readUInt32BE(0);
      }
      pump();
    });
    r.guest.write(encodeFrame(id, FrameType.OPENED));
    pump();
    // The client reads nothing: once the sockets' buffers are full the ACKs stop.
    let last = -1;
    for (let i = 0; i < 100 && acked !== last; i++) {
      last = acked;
      await new Promise((res) => setTimeout(res, 200));
    }
    expect(acked).toBe(last);
    expect(acked).toBeLessThan(total);
    expect(sent - acked).toBeLessThanOrEqual(WINDOW_BYTES);
    expect(r.accepted.writableNeedDrain).toBe(true);
    expect(r.channel.bufferedBytes).toBeLessThanOrEqual(WINDOW_BYTES + HEADER_BYTES + MAX_PAYLOAD);
    expect(r.channel.isClosed).toBe(false);

    // The client reads again: every byte arrives, in order, and every byte is acknowledged.
    let received = 0;
    let inOrder = true;
    r.client.on('data', (c: Buffer) => {
      for (let k = 0; k < c.length; k += 997) if (c[k] !== Math.floor((received + k) / chunk) % 251) inOrder = false;
      received += c.length;
    });
    r.client.resume();
    await until(() => received === total && acked === total, 'every byte at the client and acknowledged', 20_000);
    expect(inOrder).toBe(true);
    expect(r.channel.bufferedBytes).toBe(0);
    expect(r.logged).toEqual([]);
  }, 60_000);

  it('a frame whose declared length its type cannot have closes the channel when its header arrives, before its payload', async () => {
    const r = await rig();
    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.length >= 1, 'OPEN');
    const id = (r.frames[0] as Frame).connId;
    r.guest.write(encodeFrame(id, FrameType.OPENED));
    r.guest.write(frameHeader(id, FrameType.ACK, 200_000)); // an ACK is 4 bytes; the payload never comes
    await until(() => r.channel.isClosed, 'the channel to close');
    expect(r.logged).toHaveLength(1);
    expect(r.logged[0]).toMatch(/frame of type 4 with 200000 bytes/);
  });

  it('a frame type the guest may not send (unknown, or OPEN) closes the channel with one logged violation', async () => {
    for (const type of [0, 10, 255, FrameType.OPEN]) {
      const r = await rig();
      r.channel.forward(r.accepted, 80);
      await until(() => r.frames.length >= 1, 'OPEN');
      const header = Buffer.alloc(HEADER_BYTES);
      header.writeUInt32BE(12345, 0); // for a connection the host does not know, even
      header.writeUInt8(type, 4);
      r.guest.write(header);
      r.guest.write(header);
      await until(() => r.channel.isClosed, `the channel to close on type ${type}`);
      expect(r.logged).toEqual([expect.stringContaining(`frame of type ${type}: stream corrupt`)]);
    }
  });

  it('DATA before OPENED, an ACK for bytes never sent, and a second OPENED are protocol violations', async () => {
    const cases: [string, (id: number) => Buffer[], RegExp][] = [
      ['DATA before OPENED', (id) => [encodeFrame(id, FrameType.DATA, Buffer.from('x'))], /DATA for connection \d+ before OPENED/],
      [
        'ACK for bytes never sent',
        (id) => {
          const ack = Buffer.alloc(4);
          ack.writeUInt32BE(10);
          return [encodeFrame(id, FrameType.OPENED), encodeFrame(id, FrameType.ACK, ack)];
        },
        /ACK of 10 bytes .* 0 unacknowledged/,
      ],
      ['second OPENED', (id) => [encodeFrame(id, FrameType.OPENED), encodeFrame(id, FrameType.OPENED)], /second OPENED/],
    ];
    for (const [what, frames, logged] of cases) {
      const r = await rig();
      r.channel.forward(r.accepted, 80);
      await until(() => r.frames.length >= 1, 'OPEN');
      const closed = new Promise((res) => r.client.once('close', res));
      for (const f of frames((r.frames[0] as Frame).connId)) r.guest.write(f);
      await until(() => r.channel.isClosed, what);
      await closed;
      expect(r.logged).toEqual([expect.stringMatching(logged)]);
    }
  });

  it('connections past the limit are refused, and the limit is logged once', async () => {
    const r = await rig({ maxConnections: 2 });
    const tcp = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((res) => tcp.listen(0, '127.0.0.1', res));
    const port = (tcp.address() as net.AddressInfo).port;
    const clients: net.Socket[] = [];
    const accept = async (): Promise<net.Socket> => {
      const accepted = new Promise<net.Socket>((res) => tcp.once('connection', res));
      clients.push(net.connect(port, '127.0.0.1'));
      return accepted;
    };
    try {
      r.channel.forward(r.accepted, 80);
      r.channel.forward(await accept(), 80);
      expect(r.channel.connections).toBe(2);
      const third = await accept();
      const fourth = await accept();
      r.channel.forward(third, 80);
      r.channel.forward(fourth, 80);
      expect(third.destroyed && fourth.destroyed).toBe(true);
      expect(r.channel.connections).toBe(2);
      expect(r.logged).toEqual([expect.stringContaining('2 connections are open; refusing more')]);
      expect(r.channel.isClosed).toBe(false);
    } finally {
      for (const c of clients) c.destroy();
      tcp.close();
    }
  });
});

describe("DataChannel: the guest's own connections and DNS (egress)", () => {
  const connectFrame = (id: number, address: string, port: number): Buffer => {
    const p = Buffer.alloc(7);
    p[0] = 4;
    address.split('.').forEach((b, i) => (p[1 + i] = Number(b)));
    p.writeUInt16BE(port, 5);
    return encodeFrame(id, FrameType.CONNECT, p);
  };

  it('carries a guest CONNECT where the handler connects it, after its first bytes pass inspection', async () => {
    const upstream = net.createServer((s) => s.on('data', (d) => s.end(`echo:${d.toString()}`)));
    await new Promise<void>((r) => upstream.listen(0, '127.0.0.1', r));
    const port = (upstream.address() as net.AddressInfo).port;
    const seen: string[] = [];
    const r = await rig({
      egress: {
        connect: async (dest) => {
          seen.push(`${dest.address}:${dest.port}`);
          const socket = net.connect(port, '127.0.0.1');
          await new Promise((res) => socket.once('connect', res));
          return { socket, inspect: (head) => (head.length < 4 ? 'more' : head.toString().startsWith('good') ? 'ok' : { deny: 'bad' }) };
        },
        dns: () => Promise.resolve(undefined),
      },
    });
    const id = GUEST_IDS + 7;
    r.guest.write(connectFrame(id, '203.0.113.9', 443));
    await until(() => r.frames.some((f) => f.connId === id && f.type === FrameType.OPENED), 'OPENED');
    expect(seen).toEqual(['203.0.113.9:443']);
    // Two bytes are not enough to decide: nothing reaches upstream yet, then the rest passes.
    r.guest.write(encodeFrame(id, FrameType.DATA, Buffer.from('go')));
    r.guest.write(encodeFrame(id, FrameType.DATA, Buffer.from('od')));
    await until(
      () =>
        Buffer.concat(r.frames.filter((f) => f.connId === id && f.type === FrameType.DATA).map((f) => f.payload)).toString() ===
        'echo:good',
      'the echo',
    );

    // A connection whose first bytes are refused is reset, and upstream never sees them.
    const id2 = GUEST_IDS + 8;
    r.guest.write(connectFrame(id2, '203.0.113.9', 443));
    await until(() => r.frames.some((f) => f.connId === id2 && f.type === FrameType.OPENED), 'OPENED 2');
    r.guest.write(encodeFrame(id2, FrameType.DATA, Buffer.from('evil!')));
    await until(() => r.frames.some((f) => f.connId === id2 && f.type === FrameType.RST), 'RST');
    expect(r.frames.some((f) => f.connId === id2 && f.type === FrameType.DATA)).toBe(false);
    upstream.close();
  });

  it('refuses a CONNECT the handler declines (or with no handler) with RST, and answers DNS with the same id', async () => {
    const r = await rig({
      egress: { connect: () => Promise.resolve(undefined), dns: (q) => Promise.resolve(Buffer.concat([Buffer.from('A:'), q])) },
    });
    r.guest.write(connectFrame(GUEST_IDS + 1, '10.0.0.1', 80));
    r.guest.write(encodeFrame(GUEST_IDS + 3, FrameType.DNS, Buffer.from('query')));
    await until(() => r.frames.some((f) => f.connId === GUEST_IDS + 1 && f.type === FrameType.RST), 'RST');
    await until(() => r.frames.some((f) => f.connId === GUEST_IDS + 3 && f.type === FrameType.DNS), 'DNS answer');
    expect(r.frames.find((f) => f.type === FrameType.DNS)?.payload.toString()).toBe('A:query');
    const bare = await rig();
    bare.guest.write(connectFrame(GUEST_IDS + 1, '10.0.0.1', 80));
    await until(() => bare.frames.some((f) => f.type === FrameType.RST), 'RST without a handler');
  });

  it('treats a CONNECT with a host id, or a malformed one, as a protocol violation', async () => {
    const r = await rig({ egress: { connect: () => Promise.resolve(undefined), dns: () => Promise.resolve(undefined) } });
    r.guest.write(connectFrame(5, '10.0.0.1', 80));
    await until(() => r.channel.isClosed, 'the channel closed');
    expect(r.logged.join('\n')).toMatch(/malformed CONNECT/);
  });
});

describe('DataChannel: the packet link', () => {
  /** Packets as the VMM's stream socket carries them: u32 length, Ethernet header, epoch, sequence, frames. */
  function packets(buf: Buffer): { epoch: number; seq: number; frames: Frame[] }[] {
    const out: { epoch: number; seq: number; frames: Frame[] }[] = [];
    for (let off = 0; off + 4 <= buf.length;) {
      const len = buf.readUInt32BE(off);
      const p = buf.subarray(off + 4, off + 4 + len);
      off += 4 + len;
      expect(p.readUInt16BE(12)).toBe(LINK_ETHERTYPE);
      expect(p.length).toBeLessThanOrEqual(14 + LINK_MTU);
      out.push({ epoch: p.readUInt32BE(14), seq: p.readUInt32BE(18), frames: new FrameDecoder().push(p.subarray(22)) });
    }
    return out;
  }
  const credit = (n: number): Buffer => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return encodeFrame(0, FrameType.LINK, b);
  };

  it('is offered first; once the guest gives credit, frames to it go as numbered packets of whole frames, within the credit', async () => {
    const [link, vmm] = duplexPair();
    const onVmm: Buffer[] = [];
    vmm.on('data', (c: Buffer) => onVmm.push(c));
    const r = await rig({ link });
    await until(() => r.frames.length >= 1, 'the offer');
    const offer = r.frames[0] as Frame;
    expect(offer).toMatchObject({ connId: 0, type: FrameType.LINK });
    expect(offer.payload.length).toBe(5);
    expect(offer.payload[0]).toBe(LINK_OFFER);
    const epoch = offer.payload.readUInt32BE(1);

    r.channel.forward(r.accepted, 80);
    await until(() => r.frames.some((f) => f.type === FrameType.OPEN), 'OPEN on the channel (no credit yet)');
    const id = (r.frames.find((f) => f.type === FrameType.OPEN) as Frame).connId;
    r.guest.write(encodeFrame(id, FrameType.OPENED));
    r.guest.write(credit(200_000));
    await until(() => r.frames.some((f) => f.type === FrameType.LINK && f.payload[0] === LINK_SWITCHED), 'the switch');
    const onChannel = r.frames.length;

    r.client.write(Buffer.alloc(512 * 1024, 3));
    await until(() => packets(Buffer.concat(onVmm)).reduce((n, p) => n + dataBytes(p.frames), 0) > 150_000, 'DATA as packets');
    await new Promise((res) => setTimeout(res, 50));
    let got = packets(Buffer.concat(onVmm));
    const sent = (ps: typeof got): number => ps.reduce((n, p) => n + p.frames.reduce((m, f) => m + HEADER_BYTES + f.payload.length, 0), 0);
    expect(sent(got)).toBeLessThanOrEqual(200_000);
    expect(got.map((p) => p.seq)).toEqual(got.map((_, i) => i));
    expect(got.every((p) => p.epoch === epoch)).toBe(true);
    expect(r.frames.length).toBe(onChannel); // nothing more on the channel itself

    r.guest.write(credit(LINK_WINDOW_BYTES));
    await until(() => packets(Buffer.concat(onVmm)).reduce((n, p) => n + dataBytes(p.frames), 0) === 512 * 1024, 'the rest');
    got = packets(Buffer.concat(onVmm));
    expect(got.map((p) => p.seq)).toEqual(got.map((_, i) => i));
  });

  it('a LINK frame from the guest of a channel without a link is a protocol violation', async () => {
    const r = await rig();
    r.guest.write(credit(1000));
    await until(() => r.channel.isClosed, 'the channel closed');
    expect(r.logged.join('\n')).toMatch(/LINK frame that was not asked for/);
  });

  it('the link ending ends the channel and its connections', async () => {
    const [link, vmm] = duplexPair();
    vmm.resume();
    const r = await rig({ link });
    vmm.destroy();
    await until(() => r.channel.isClosed, 'the channel closed');
  });
});
