/**
 * The host end of a VM's data channel (protocol/data-frames.ts): each forwarded connection
 * is spliced between a host socket and a guest socket that aegis-init opens on the guest's
 * loopback. Flow control is by credit: at most WINDOW_BYTES read from the host socket and not
 * yet acknowledged by the guest, so a slow guest reader pauses the host client, not our memory.
 * Everything from the guest is untrusted: a frame for an unknown connection is ignored, and a
 * corrupt stream closes the channel (and with it every forwarded connection).
 */
import type net from 'node:net';
import type { Duplex } from 'node:stream';
import { frameHeader, FrameDecoder, FrameType, MAX_PAYLOAD, WINDOW_BYTES, type Frame } from '@aegis/protocol';

/** As patient as a TCP connect: a guest server with a short accept queue leaves SYNs to be retried. */
const OPEN_TIMEOUT_MS = 75_000;

interface Conn {
  socket: net.Socket;
  opened: boolean;
  unacked: number;
  paused: boolean;
  sentFin: boolean;
  gotFin: boolean;
  timer: NodeJS.Timeout | undefined;
}

export class DataChannel {
  private readonly conns = new Map<number, Conn>();
  private readonly decoder = new FrameDecoder();
  private nextId = 1;
  private closed = false;

  constructor(private readonly stream: Duplex) {
    stream.on('data', (chunk: Buffer) => {
      let frames: Frame[];
      try {
        frames = this.decoder.push(chunk);
      } catch {
        this.close();
        return;
      }
      for (const f of frames) this.onFrame(f);
    });
    stream.on('error', () => this.close());
    stream.on('close', () => this.close());
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Forwards `socket` (paused, as accepted) to `guestPort` on the guest's loopback. */
  forward(socket: net.Socket, guestPort: number): void {
    if (this.closed) return void socket.destroy();
    const id = this.nextId;
    this.nextId = this.nextId >= 0xffffffff ? 1 : this.nextId + 1;
    const c: Conn = { socket, opened: false, unacked: 0, paused: false, sentFin: false, gotFin: false, timer: undefined };
    this.conns.set(id, c);
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      // The host side went before both directions finished: tell the guest to let go.
      if (this.conns.get(id) === c) {
        this.forget(id);
        this.send(id, FrameType.RST);
      }
    });
    socket.on('data', (chunk: Buffer) => {
      for (let off = 0; off < chunk.length; off += MAX_PAYLOAD) this.send(id, FrameType.DATA, chunk.subarray(off, off + MAX_PAYLOAD));
      c.unacked += chunk.length;
      if (c.unacked >= WINDOW_BYTES && !c.paused) {
        c.paused = true;
        socket.pause();
      }
    });
    socket.on('end', () => {
      c.sentFin = true;
      this.send(id, FrameType.FIN);
      this.finishIfDone(id, c);
    });
    c.timer = setTimeout(() => socket.destroy(), OPEN_TIMEOUT_MS);
    const port = Buffer.alloc(2);
    port.writeUInt16BE(guestPort);
    this.send(id, FrameType.OPEN, port);
  }

  private onFrame(f: Frame): void {
    const c = this.conns.get(f.connId);
    if (!c) return;
    switch (f.type) {
      case FrameType.OPENED:
        if (c.opened) return;
        c.opened = true;
        clearTimeout(c.timer);
        c.socket.setNoDelay(true);
        c.socket.resume();
        return;
      case FrameType.DATA: {
        if (!c.opened || c.gotFin) return this.abort(f.connId, c);
        const n = f.payload.length;
        // A view into a chunk the channel handed us: nothing else writes to that memory.
        c.socket.write(f.payload, (err) => {
          if (!err && this.conns.get(f.connId) === c) {
            const ack = Buffer.alloc(4);
            ack.writeUInt32BE(n);
            this.send(f.connId, FrameType.ACK, ack);
          }
        });
        return;
      }
      case FrameType.ACK:
        if (f.payload.length !== 4) return;
        c.unacked = Math.max(0, c.unacked - f.payload.readUInt32BE(0));
        if (c.paused && c.unacked < WINDOW_BYTES / 2) {
          c.paused = false;
          c.socket.resume();
        }
        return;
      case FrameType.FIN:
        c.gotFin = true;
        c.socket.end();
        this.finishIfDone(f.connId, c);
        return;
      case FrameType.RST:
        // Refused or reset in the guest: the client sees the connection closed, as with Docker.
        this.forget(f.connId);
        c.socket.destroy();
        return;
    }
  }

  private finishIfDone(id: number, c: Conn): void {
    if (c.sentFin && c.gotFin) this.forget(id);
  }

  private abort(id: number, c: Conn): void {
    this.forget(id);
    this.send(id, FrameType.RST);
    c.socket.destroy();
  }

  private forget(id: number): void {
    const c = this.conns.get(id);
    if (c) clearTimeout(c.timer);
    this.conns.delete(id);
  }

  private send(id: number, type: FrameType, payload?: Buffer): void {
    if (this.closed) return;
    // Header and payload as two writes: bulk DATA is not copied into a frame buffer first.
    this.stream.write(frameHeader(id, type, payload?.length ?? 0));
    if (payload && payload.length > 0) this.stream.write(payload);
  }

  /** The VM or its channel went: every forwarded connection ends. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const [id, c] of this.conns) {
      this.forget(id);
      c.socket.destroy();
    }
    this.stream.destroy();
  }
}
