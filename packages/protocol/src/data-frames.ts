/**
 * The data channel's wire format (the guest end is aegis-init's dataplane.c, in C): forwarded
 * TCP connections as binary frames, so bulk bytes are copied rather than encoded. A frame is
 * a 9-byte header (u32 connection id, u8 type, u32 payload length; big-endian) and a payload
 * of at most MAX_PAYLOAD bytes. Each side keeps at most WINDOW_BYTES of DATA per connection
 * unacknowledged. spec/guest-rpc.md ("Data channel") is the prose of this contract.
 */
export const FrameType = {
  /** host→guest; payload u16 port: connect to 127.0.0.1 (then ::1) on it in the guest. */
  OPEN: 1,
  /** guest→host: the connection is up. */
  OPENED: 2,
  DATA: 3,
  /** payload u32: that many DATA bytes were written to the receiver's socket. */
  ACK: 4,
  /** The sender's socket will send no more (half-close). */
  FIN: 5,
  /** The connection is gone: refused, reset, or aborted. */
  RST: 6,
  /**
   * guest→host; payload u8 4, 4-byte IPv4 address, u16 port: a connection a program of the
   * guest's opened (aegis-init redirected it to the data plane); the host connects it where the
   * egress policy allows and answers OPENED, or refuses with RST. Its id has GUEST_IDS set.
   */
  CONNECT: 7,
  /** Both ways: a DNS message, a query from the guest or the host's answer (same id). */
  DNS: 8,
  /**
   * The packet link (below), connection id 0. host→guest, payload u8 LINK_OFFER: "I can send
   * you frames as packets; the link's epoch is this u32" (5 bytes); payload u8 LINK_SWITCHED:
   * "every frame after this one comes as packets". guest→host, payload u32: credit, "you may
   * send this many more frame bytes as packets" (the first one accepts the offer). A guest
   * without the link ignores the offer, and the host keeps sending on this channel.
   */
  LINK: 9,
} as const;
export type FrameType = (typeof FrameType)[keyof typeof FrameType];

export const HEADER_BYTES = 9;
export const MAX_PAYLOAD = 256 * 1024;
export const WINDOW_BYTES = 1024 * 1024;
/** Ids of connections (and DNS queries) the guest starts have this bit set; the host's never do. */
export const GUEST_IDS = 0x80000000;
/** The longest DNS message either side sends (EDNS over UDP allows 4096 bytes). */
export const DNS_MAX_BYTES = 4096;
/** Connections one channel carries at once (the guest end, dataplane.c, has as many slots). */
export const MAX_CONNECTIONS = 1024;

/**
 * The packet link: host→guest frames carried as Ethernet packets on a network device of their
 * own (QEMU: virtio-net with a 64 KiB MTU, its `-netdev stream` socket held by aegisd), so the
 * guest takes ~64 KiB per interrupt and per read instead of a virtio-serial port's 4 KiB
 * (docs/design.md, "Egress", has the measurements). Guest→host frames stay on the data channel,
 * which also carries LINK's offer, switch and credits, so the two are ordered by one stream.
 * A packet: destination and source MAC, LINK_ETHERTYPE, then u32 epoch, u32 sequence number
 * (from 0), then whole frames, at most LINK_PAYLOAD_BYTES of them. The guest discards a packet
 * of another epoch (one left from an earlier host), and a gap in the sequence (which only a
 * full receive buffer makes: the credit window is there to prevent it) ends every connection.
 */
export const LINK_ETHERTYPE = 0x88b5; // IEEE 802 "local experimental"
export const LINK_OFFER = 1;
export const LINK_SWITCHED = 2;
/** The device's MTU: what a packet carries after its Ethernet header. */
export const LINK_MTU = 65520;
export const LINK_HEADER_BYTES = 8;
/** Frame bytes per packet; a DATA frame sent as packets carries at most this less HEADER_BYTES. */
export const LINK_PAYLOAD_BYTES = LINK_MTU - LINK_HEADER_BYTES;
/** The most frame bytes sent and not yet credited back; the guest's receive buffer is well above it. */
export const LINK_WINDOW_BYTES = 4 * 1024 * 1024;

export interface Frame {
  connId: number;
  type: number;
  payload: Buffer;
}

/** The 9 header bytes alone: a sender can write them and then the payload, uncopied. */
export function frameHeader(connId: number, type: FrameType, payloadBytes: number): Buffer {
  if (payloadBytes > MAX_PAYLOAD) throw new RangeError(`frame payload of ${payloadBytes} bytes exceeds ${MAX_PAYLOAD}`);
  const h = Buffer.allocUnsafe(HEADER_BYTES);
  h.writeUInt32BE(connId >>> 0, 0);
  h.writeUInt8(type, 4);
  h.writeUInt32BE(payloadBytes, 5);
  return h;
}

export function encodeFrame(connId: number, type: FrameType, payload: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([frameHeader(connId, type, payload.length), payload]);
}

/**
 * The longest payload a frame of `type` may declare, or -1 for a type that may not arrive at
 * all. The decoder checks it as soon as a header is complete, before buffering the payload.
 */
export type FrameLimit = (type: number) => number;

/**
 * Splits a byte stream into frames; a frame longer than its limit (by default MAX_PAYLOAD for
 * every type) means the stream is corrupt, and `push` throws a RangeError as soon as the header
 * says so. Chunks are kept as they arrive and a frame is copied out at most once (not at all
 * when one chunk holds it): joining every chunk to the remainder copied each byte several times.
 */
export class FrameDecoder {
  private chunks: Buffer[] = [];
  private total = 0;

  constructor(private readonly limit: FrameLimit = () => MAX_PAYLOAD) {}

  /** Bytes received and not yet returned as frames: at most one frame's worth and one chunk. */
  get buffered(): number {
    return this.total;
  }

  push(chunk: Buffer): Frame[] {
    if (chunk.length > 0) {
      this.chunks.push(chunk);
      this.total += chunk.length;
    }
    const frames: Frame[] = [];
    while (this.total >= HEADER_BYTES) {
      const head = this.peek(HEADER_BYTES);
      const len = head.readUInt32BE(5);
      const type = head.readUInt8(4);
      const max = Math.min(this.limit(type), MAX_PAYLOAD);
      if (max < 0) throw new RangeError(`data channel frame of type ${type}: stream corrupt`);
      if (len > max) throw new RangeError(`data channel frame of type ${type} with ${len} bytes (at most ${max}): stream corrupt`);
      if (this.total < HEADER_BYTES + len) break;
      const frame = this.take(HEADER_BYTES + len);
      frames.push({ connId: frame.readUInt32BE(0), type: frame.readUInt8(4), payload: frame.subarray(HEADER_BYTES) });
    }
    return frames;
  }

  private peek(n: number): Buffer {
    const first = this.chunks[0] as Buffer;
    return first.length >= n ? first : Buffer.concat(this.chunks, n);
  }

  private take(n: number): Buffer {
    this.total -= n;
    const first = this.chunks[0] as Buffer;
    if (first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let off = 0;
    while (off < n) {
      const c = this.chunks[0] as Buffer;
      const k = Math.min(c.length, n - off);
      c.copy(out, off, 0, k);
      off += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }
}
