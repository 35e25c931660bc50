/**
 * The host end of the data channel's packet link (protocol/data-frames.ts, LINK_*): frames
 * given to `send` go to the guest as Ethernet packets on the VMM's stream socket (QEMU's
 * `-netdev stream` framing: a u32 big-endian length, then the packet), each holding whole
 * frames, within the credit the guest has given. What the guest sends on the device is read
 * and dropped: nothing of ours travels that way, and nothing it says there is believed.
 */
import { randomInt } from 'node:crypto';
import type { Duplex } from 'node:stream';
import { LINK_ETHERTYPE, LINK_HEADER_BYTES, LINK_PAYLOAD_BYTES, LINK_WINDOW_BYTES } from '@aegis/protocol';

/** Broadcast (the device filters other unicast addresses) from a locally administered address. */
const ETHERNET_HEADER = Buffer.from([
  0xff,
  0xff,
  0xff,
  0xff,
  0xff,
  0xff,
  0x02,
  0xae,
  0,
  0,
  0,
  0xfe,
  LINK_ETHERTYPE >> 8,
  LINK_ETHERTYPE & 0xff,
]);

export class PacketLink {
  /** Names this link's packets: the guest drops any of an earlier host's still in its queue. */
  readonly epoch = randomInt(2 ** 32);
  private seq = 0;
  private credit = 0;
  /** Frames waiting for credit, each as its parts (header, payload). */
  private readonly queue: Array<{ parts: Buffer[]; bytes: number }> = [];
  private head = 0;

  constructor(private readonly socket: Duplex) {
    socket.on('data', () => undefined);
  }

  /** Queues one frame, as its parts (at most LINK_PAYLOAD_BYTES: a caller splits DATA to fit), and sends what the credit allows. */
  send(...parts: Buffer[]): void {
    const bytes = parts.reduce((n, p) => n + p.length, 0);
    if (bytes > LINK_PAYLOAD_BYTES) throw new RangeError(`a frame of ${bytes} bytes does not fit a packet`);
    this.queue.push({ parts, bytes });
    this.pump();
  }

  /** The guest took `bytes` more from its socket. A guest that grants more than a window only risks its own packets. */
  grant(bytes: number): void {
    this.credit = Math.min(this.credit + bytes, 2 * LINK_WINDOW_BYTES);
    this.pump();
  }

  private pump(): void {
    while (this.head < this.queue.length) {
      const frames: Buffer[] = [];
      let bytes = 0;
      while (this.head < this.queue.length) {
        const f = this.queue[this.head] as { parts: Buffer[]; bytes: number };
        if (bytes + f.bytes > LINK_PAYLOAD_BYTES || bytes + f.bytes > this.credit) break;
        frames.push(...f.parts);
        bytes += f.bytes;
        this.head++;
      }
      if (frames.length === 0) break;
      this.credit -= bytes;
      const h = Buffer.allocUnsafe(4 + ETHERNET_HEADER.length + LINK_HEADER_BYTES);
      h.writeUInt32BE(ETHERNET_HEADER.length + LINK_HEADER_BYTES + bytes, 0);
      ETHERNET_HEADER.copy(h, 4);
      h.writeUInt32BE(this.epoch, 4 + ETHERNET_HEADER.length);
      h.writeUInt32BE(this.seq, 8 + ETHERNET_HEADER.length);
      this.seq = (this.seq + 1) >>> 0;
      this.socket.write(Buffer.concat([h, ...frames], h.length + bytes));
    }
    if (this.head > 1024 || this.head === this.queue.length) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
  }

  /** Bytes queued for want of credit (part of what the channel holds for its connections). */
  get queuedBytes(): number {
    let n = 0;
    for (let i = this.head; i < this.queue.length; i++) n += (this.queue[i] as { bytes: number }).bytes;
    return n;
  }

  close(): void {
    this.queue.length = 0;
    this.head = 0;
    this.socket.destroy();
  }
}
