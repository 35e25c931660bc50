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
import { encodeFrame, FrameDecoder, FrameType, WINDOW_BYTES, type Frame } from '@aegis/protocol';
import { DataChannel } from './data-channel.js';

interface Rig {
  channel: DataChannel;
  /** The guest's end of the channel. */
  guest: net.Socket;
  frames: Frame[];
  /** The user's TCP connection, and the host socket aegisd accepted for it. */
  client: net.Socket;
  accepted: net.Socket;
  close(): void;
}

const rigs: Rig[] = [];
afterEach(() => {
  for (const r of rigs.splice(0)) r.close();
});

async function rig(): Promise<Rig> {
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
  const channel = new DataChannel(hostEnd);
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
    guest,
    frames,
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

async function until(cond: () => boolean, what: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
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
});
