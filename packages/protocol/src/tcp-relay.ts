/**
 * One forwarded TCP connection, seen from one end of the agent channel: bytes read from the
 * local socket go out as `tcpData`; bytes that arrive are written to it and acknowledged with
 * `tcpAck` once written; reading stops while more than `WINDOW_BYTES` are unacknowledged.
 * `tcpClose` ends one direction (a half-close), as a FIN does. Used by the harness and aegisd.
 */
import type { Duplex } from 'node:stream';
import type { HostEvents } from './guest.js';

const WINDOW_BYTES = 1 << 20;

export type RelaySend = <E extends keyof HostEvents>(event: E, params: HostEvents[E]) => void;

export class TcpRelay {
  private unacked = 0;
  private sentClose = false;
  private paused = false;

  constructor(
    readonly connId: number,
    private readonly socket: Duplex,
    private readonly send: RelaySend,
    onDone: () => void,
  ) {
    socket.on('data', (chunk: Buffer) => {
      send('tcpData', { connId, data: chunk.toString('base64') });
      this.unacked += chunk.length;
      if (this.unacked > WINDOW_BYTES && !this.paused) {
        this.paused = true;
        socket.pause();
      }
    });
    socket.on('end', () => this.closeOut());
    socket.on('error', () => socket.destroy());
    socket.on('close', () => {
      this.closeOut();
      onDone();
    });
  }

  private closeOut(): void {
    if (this.sentClose) return;
    this.sentClose = true;
    this.send('tcpClose', { connId: this.connId });
  }

  /** Bytes from the other end, for our socket. */
  data(base64: string): void {
    const buf = Buffer.from(base64, 'base64');
    if (this.socket.destroyed || this.socket.writableEnded) return;
    this.socket.write(buf, (err) => {
      if (!err) this.send('tcpAck', { connId: this.connId, bytes: buf.length });
    });
  }

  ack(bytes: number): void {
    this.unacked = Math.max(0, this.unacked - bytes);
    if (this.paused && this.unacked <= WINDOW_BYTES / 2) {
      this.paused = false;
      this.socket.resume();
    }
  }

  /** The other end will send no more. */
  remoteClosed(): void {
    if (!this.socket.destroyed && !this.socket.writableEnded) this.socket.end();
  }

  destroy(): void {
    this.socket.destroy();
  }
}
