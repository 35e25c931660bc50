/**
 * The host end of a VM's data channel (protocol/data-frames.ts): each forwarded connection
 * is spliced between a host socket and a guest socket that aegis-init opens on the guest's
 * loopback. Flow control is by credit, both ways, WINDOW_BYTES per connection:
 * - host → guest: at most a window read from the host socket and not yet acknowledged by the
 *   guest, so a slow guest reader pauses the host client, not our memory;
 * - guest → host: the guest may have at most a window of DATA that we have not acknowledged,
 *   and we acknowledge bytes only once the client's socket has taken them and is not pushing
 *   back (its write() said false: no ACK until 'drain'). So a slow client slows the guest, and
 *   what we hold for a connection never exceeds the window.
 * Everything from the guest is untrusted. A frame for a connection we do not know (one that
 * ended, or that we never opened) is ignored; anything a correct guest never sends (a frame
 * type it may not send, a length its type cannot have, DATA past the window, an ACK for bytes
 * we did not send, DATA before OPENED or after FIN) is a protocol violation: it is logged once
 * and the whole channel is closed, with every forwarded connection (as a VMM stops a virtio
 * device whose driver broke the rules: a guest that does this is broken or hostile).
 */
import type { Duplex } from 'node:stream';
import {
  DNS_MAX_BYTES,
  frameHeader,
  FrameDecoder,
  FrameType,
  GUEST_IDS,
  HEADER_BYTES,
  LINK_OFFER,
  LINK_PAYLOAD_BYTES,
  LINK_SWITCHED,
  MAX_CONNECTIONS,
  MAX_PAYLOAD,
  WINDOW_BYTES,
  type Frame,
} from '@aegis/protocol';
import { stderrLogger, type Logger } from '../log.js';
import { PacketLink } from './packet-link.js';

/** As patient as a TCP connect: a guest server with a short accept queue leaves SYNs to be retried. */
const OPEN_TIMEOUT_MS = 75_000;

/** While a client pushes back, guest DATA is copied into buffers of this size (not one per frame). */
const BACKLOG_CHUNK = 64 * 1024;

/** The payload each frame type may carry from the guest; -1: the guest may not send it. */
function guestFrameLimit(type: number): number {
  switch (type) {
    case FrameType.DATA:
      return MAX_PAYLOAD;
    case FrameType.ACK:
      return 4;
    case FrameType.OPENED:
    case FrameType.FIN:
    case FrameType.RST:
      return 0;
    case FrameType.CONNECT:
      return 7;
    case FrameType.DNS:
      return DNS_MAX_BYTES;
    case FrameType.LINK:
      return 4;
    default:
      return -1; // OPEN goes host → guest only; anything else is no frame at all
  }
}

/** A TCP client's socket, or one end of a duplexPair (a file transfer of the daemon's own). */
export type ConnSocket = Duplex & { setNoDelay?: (noDelay: boolean) => unknown };

/** Where a connection of the guest's own was headed (SO_ORIGINAL_DST in the guest). */
export interface GuestDestination {
  address: string;
  port: number;
}

/**
 * What a guest connection's first bytes decide: `more` (not enough yet), `ok` (carry it, those
 * bytes first), `taken` (carry it, but the inspector took those bytes itself: the secret
 * broker replays them), or a reason to refuse it (a TLS server name or HTTP host the policy
 * does not allow).
 */
export type FirstBytesVerdict = 'more' | 'ok' | 'taken' | { deny: string };

/** A guest connection the egress policy let through, connected to where it was headed. */
export interface EgressConnection {
  socket: ConnSocket;
  /** Checks the guest's first bytes before any reach `socket` (they are held, within the window, until it decides). */
  inspect?: (head: Buffer, ended: boolean) => FirstBytesVerdict;
}

/** The host side of the guest's own network traffic (the egress policy, instances/egress). */
export interface EgressHandler {
  /** Resolves with the connection, or undefined to refuse it (the guest's program sees a reset). */
  connect(dest: GuestDestination): Promise<EgressConnection | undefined>;
  /** Answers a DNS query (undefined: no answer; the guest's resolver retries or gives up). */
  dns(query: Buffer): Promise<Buffer | undefined>;
}

/** The most DNS queries of one guest answered at once (the guest keeps as many slots). */
const MAX_DNS_IN_FLIGHT = 64;
/** The most of a guest connection's first bytes held for `inspect` (a TLS ClientHello fits well within). */
const INSPECT_MAX_BYTES = 16 * 1024;

interface Conn {
  socket: ConnSocket;
  opened: boolean;
  /** host → guest: bytes sent as DATA and not yet acknowledged by the guest. */
  unacked: number;
  paused: boolean;
  sentFin: boolean;
  gotFin: boolean;
  timer: NodeJS.Timeout | undefined;
  /** guest → host: DATA received and not yet acknowledged (queued here, or taken by the socket). */
  held: number;
  /** Of `held`, bytes the socket has taken, to acknowledge once it is not pushing back. */
  ackable: number;
  /** The socket's write() said false: no ACKs and no more writes until 'drain'. */
  blocked: boolean;
  /** A guest connection whose first bytes are still being checked (EgressConnection.inspect). */
  inspect: EgressConnection['inspect'];
  /** What arrived while inspecting. */
  head: Buffer[];
  /** DATA that arrived while blocked, coalesced; `tail` is the last buffer, `tailLen` its fill. */
  backlog: Buffer[];
  tail: Buffer | undefined;
  tailLen: number;
}

export interface DataChannelOptions {
  /** Where a protocol violation is reported (once per channel); default: the daemon's stderr log. */
  log?: Logger;
  /** Names the channel in log lines, e.g. "instance web: data channel". */
  name?: string;
  maxConnections?: number;
  /** Bytes went through a connection: from the host's socket (`fromHost`) or from the guest. */
  onTraffic?: (fromHost: boolean) => void;
  /** Carries the guest's own connections and DNS; without it every CONNECT is refused. */
  egress?: EgressHandler;
  /**
   * The VM's packet link (`Vm.connectDataLink`): offered to the guest, and once it accepts,
   * every frame to the guest goes that way. Its end ends the channel.
   */
  link?: Duplex;
}

export class DataChannel {
  private readonly conns = new Map<number, Conn>();
  private decoder = new FrameDecoder(guestFrameLimit);
  private readonly log: Logger;
  private readonly name: string;
  private readonly maxConnections: number;
  private readonly onTraffic: ((fromHost: boolean) => void) | undefined;
  private readonly egress: EgressHandler | undefined;
  /** Guest connections the egress handler is still deciding (a RST from the guest cancels). */
  private readonly pending = new Set<number>();
  private dnsInFlight = 0;
  private readonly closeListeners: Array<() => void> = [];
  private nextId = 1;
  private closed = false;
  /** The connection limit is logged once per channel: a client retrying at it would flood the log. */
  private warnedFull = false;
  /** Sum of every connection's `held`. */
  private heldTotal = 0;
  private readonly link: PacketLink | undefined;
  /** `offered` until the guest's first credit; then frames to the guest go as packets. */
  private linkState: 'none' | 'offered' | 'on' = 'none';

  constructor(
    private readonly stream: Duplex,
    options: DataChannelOptions = {},
  ) {
    this.log = options.log ?? stderrLogger();
    this.name = options.name ?? 'data channel';
    this.maxConnections = options.maxConnections ?? MAX_CONNECTIONS;
    this.onTraffic = options.onTraffic;
    this.egress = options.egress;
    if (options.link) {
      const link = options.link;
      this.link = new PacketLink(link);
      link.on('error', () => this.close());
      link.on('close', () => this.close());
      const offer = Buffer.alloc(5);
      offer.writeUInt8(LINK_OFFER, 0);
      offer.writeUInt32BE(this.link.epoch, 1);
      this.send(0, FrameType.LINK, offer);
      this.linkState = 'offered';
    }
    stream.on('data', (chunk: Buffer) => {
      if (this.closed) return;
      let frames: Frame[];
      try {
        frames = this.decoder.push(chunk);
      } catch (err) {
        return this.violation((err as Error).message);
      }
      for (const f of frames) {
        if (this.closed) return;
        this.onFrame(f);
      }
    });
    stream.on('error', () => this.close());
    stream.on('close', () => this.close());
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Runs `fn` once the channel has closed (at once if it has). */
  onClose(fn: () => void): void {
    if (this.closed) return fn();
    this.closeListeners.push(fn);
  }

  /**
   * Guest bytes this end holds: DATA not yet acknowledged, for every connection, plus what the
   * frame decoder keeps of an incomplete frame. Bounded by connections × WINDOW_BYTES plus one
   * frame and one chunk of the channel.
   */
  get bufferedBytes(): number {
    return this.heldTotal + this.decoder.buffered;
  }

  get connections(): number {
    return this.conns.size;
  }

  /**
   * Forwards `socket` (paused, as accepted) to `guestPort` on the guest's loopback; port 0 is
   * the harness's file service.
   */
  forward(socket: ConnSocket, guestPort: number, openTimeoutMs = OPEN_TIMEOUT_MS): void {
    if (this.closed) return void socket.destroy();
    if (this.conns.size >= this.maxConnections) {
      if (!this.warnedFull) {
        this.warnedFull = true;
        this.log.warn(`${this.name}: ${this.maxConnections} connections are open; refusing more until some close`);
      }
      return void socket.destroy();
    }
    const id = this.allocateId();
    const c = this.register(id, socket, false);
    c.timer = setTimeout(() => socket.destroy(), openTimeoutMs);
    const port = Buffer.alloc(2);
    port.writeUInt16BE(guestPort);
    this.send(id, FrameType.OPEN, port);
  }

  /** A connection's state, and its socket's events wired to frames. */
  private register(id: number, socket: ConnSocket, opened: boolean, inspect?: EgressConnection['inspect']): Conn {
    const c: Conn = {
      socket,
      opened,
      unacked: 0,
      paused: false,
      sentFin: false,
      gotFin: false,
      timer: undefined,
      held: 0,
      ackable: 0,
      blocked: false,
      inspect,
      head: [],
      backlog: [],
      tail: undefined,
      tailLen: 0,
    };
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
      this.onTraffic?.(true);
      // A packet holds whole frames, so DATA sent as packets is cut to fit one.
      const max = this.linkState === 'on' ? LINK_PAYLOAD_BYTES - HEADER_BYTES : MAX_PAYLOAD;
      for (let off = 0; off < chunk.length; off += max) this.send(id, FrameType.DATA, chunk.subarray(off, off + max));
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
    return c;
  }

  /** The next id no open connection uses (ids wrap below GUEST_IDS; 0 is never used). */
  private allocateId(): number {
    for (;;) {
      const id = this.nextId;
      this.nextId = this.nextId >= GUEST_IDS - 1 ? 1 : this.nextId + 1;
      if (!this.conns.has(id)) return id;
    }
  }

  private onFrame(f: Frame): void {
    // Types and lengths were checked by the decoder (guestFrameLimit).
    if (f.type === FrameType.CONNECT) return this.onConnect(f.connId, f.payload);
    if (f.type === FrameType.DNS) return this.onDns(f.connId, f.payload);
    if (f.type === FrameType.LINK) return this.onLink(f.connId, f.payload);
    const c = this.conns.get(f.connId);
    if (!c) {
      // A guest connection still being decided, given up on by the guest.
      if (f.type === FrameType.RST) this.pending.delete(f.connId);
      return; // ended here already (RST crossed in flight), or never ours: nothing to do
    }
    switch (f.type) {
      case FrameType.OPENED:
        if (c.opened)
          return this.violation(`${f.connId >= GUEST_IDS ? "OPENED for the guest's own" : 'a second OPENED for'} connection ${f.connId}`);
        c.opened = true;
        clearTimeout(c.timer);
        c.socket.setNoDelay?.(true);
        c.socket.resume();
        return;
      case FrameType.DATA:
        return this.onData(f.connId, c, f.payload);
      case FrameType.ACK: {
        if (f.payload.length !== 4) return this.violation(`an ACK of ${f.payload.length} bytes for connection ${f.connId}`);
        const n = f.payload.readUInt32BE(0);
        if (n > c.unacked) return this.violation(`an ACK of ${n} bytes for connection ${f.connId}, which has ${c.unacked} unacknowledged`);
        c.unacked -= n;
        if (c.paused && c.unacked < WINDOW_BYTES / 2) {
          c.paused = false;
          c.socket.resume();
        }
        return;
      }
      case FrameType.FIN:
        if (!c.opened || c.gotFin) return this.violation(`FIN for connection ${f.connId} ${c.gotFin ? 'twice' : 'before OPENED'}`);
        c.gotFin = true;
        if (c.inspect) {
          this.inspectHead(f.connId, c, true);
          if (this.conns.get(f.connId) !== c) return;
        }
        // After what is still queued for the client: end() follows every write before it.
        this.flushBacklog(f.connId, c);
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

  private onData(id: number, c: Conn, payload: Buffer): void {
    if (!c.opened || c.gotFin) return this.violation(`DATA for connection ${id} ${c.gotFin ? 'after FIN' : 'before OPENED'}`);
    const n = payload.length;
    if (n === 0) return this.violation(`an empty DATA frame for connection ${id}`);
    if (c.held + n > WINDOW_BYTES) {
      return this.violation(
        `DATA for connection ${id} past its window: ${c.held} bytes unacknowledged, ${n} more sent (window ${WINDOW_BYTES})`,
      );
    }
    c.held += n;
    this.heldTotal += n;
    this.onTraffic?.(false);
    if (c.inspect) {
      c.head.push(payload);
      return this.inspectHead(id, c, false);
    }
    if (c.blocked) this.appendBacklog(c, payload);
    else this.writeToClient(id, c, payload); // a view into a chunk the channel handed us: nothing else writes to it
  }

  /**
   * A CONNECT from the guest: one of its programs connected somewhere. The egress handler
   * decides (and connects) while the guest's program waits; a refusal is a RST.
   */
  private onConnect(id: number, dest: Buffer): void {
    if (id < GUEST_IDS || dest.length !== 7 || dest[0] !== 4) return this.violation(`a malformed CONNECT (id ${id}, ${dest.length} bytes)`);
    if (this.conns.has(id) || this.pending.has(id)) return this.violation(`CONNECT for connection ${id}, which is open`);
    const egress = this.egress;
    if (!egress || this.conns.size + this.pending.size >= this.maxConnections) return this.send(id, FrameType.RST);
    const to: GuestDestination = { address: `${dest[1]}.${dest[2]}.${dest[3]}.${dest[4]}`, port: dest.readUInt16BE(5) };
    this.pending.add(id);
    const refuse = (): void => {
      if (!this.pending.delete(id)) return;
      this.send(id, FrameType.RST);
    };
    egress.connect(to).then(
      (conn) => {
        if (!conn) return refuse();
        if (!this.pending.delete(id) || this.closed) return void conn.socket.destroy();
        this.register(id, conn.socket, true, conn.inspect);
        conn.socket.setNoDelay?.(true);
        this.send(id, FrameType.OPENED);
      },
      (err: unknown) => {
        this.log.warn(`${this.name}: egress to ${to.address}:${to.port}: ${(err as Error).message}`);
        refuse();
      },
    );
  }

  /** The guest's credit on the packet link; the first accepts the offer, and the frames after it go as packets. */
  private onLink(id: number, credit: Buffer): void {
    const link = this.link;
    if (id !== 0 || credit.length !== 4 || !link)
      return this.violation(`a LINK frame that was not asked for (id ${id}, ${credit.length} bytes)`);
    if (this.linkState === 'offered') {
      // The last frame on the channel: the guest reads packets only after it.
      this.send(0, FrameType.LINK, Buffer.from([LINK_SWITCHED]));
      this.linkState = 'on';
    }
    link.grant(credit.readUInt32BE(0));
  }

  private onDns(id: number, query: Buffer): void {
    if (id < GUEST_IDS) return this.violation(`a DNS query with id ${id}`);
    const egress = this.egress;
    if (!egress || this.dnsInFlight >= MAX_DNS_IN_FLIGHT) return; // dropped, as a busy link drops; the resolver retries
    this.dnsInFlight++;
    egress
      .dns(query)
      .catch(() => undefined)
      .then((answer) => {
        this.dnsInFlight--;
        if (answer && answer.length <= DNS_MAX_BYTES) this.send(id, FrameType.DNS, answer);
      })
      .catch(() => undefined);
  }

  /** The guest's first bytes on a connection: carried once `inspect` says so, refused if it does not. */
  private inspectHead(id: number, c: Conn, ended: boolean): void {
    const inspect = c.inspect;
    if (!inspect) return;
    const head = Buffer.concat(c.head);
    let verdict = head.length > INSPECT_MAX_BYTES ? { deny: `${head.length} bytes without a decision` } : inspect(head, ended);
    if (verdict === 'more' && ended) verdict = { deny: 'the connection ended before the policy could decide' };
    if (verdict === 'more') return;
    c.inspect = undefined;
    c.head = [];
    if (verdict === 'taken') {
      c.ackable += head.length;
      return this.acknowledge(id, c);
    }
    if (verdict !== 'ok') {
      this.forget(id);
      this.send(id, FrameType.RST);
      c.socket.destroy();
      return;
    }
    this.writeToClient(id, c, head);
  }

  /** Writes to the client; when its write() says false, ACKs stop until 'drain'. */
  private writeToClient(id: number, c: Conn, buf: Buffer): void {
    const n = buf.length;
    const ok = c.socket.write(buf, (err) => {
      if (err || this.conns.get(id) !== c) return;
      c.ackable += n;
      if (!c.blocked) this.acknowledge(id, c);
    });
    if (!ok && !c.blocked && !c.socket.destroyed) {
      c.blocked = true;
      c.socket.once('drain', () => this.onDrain(id, c));
    }
  }

  private onDrain(id: number, c: Conn): void {
    if (this.conns.get(id) !== c) return;
    c.blocked = false;
    this.flushBacklog(id, c);
    if (!c.blocked) this.acknowledge(id, c);
  }

  /**
   * Copies DATA that arrives while the client pushes back into BACKLOG_CHUNK buffers: queueing
   * each frame as a write of its own would cost a write request per frame (a guest sending
   * 1-byte frames would make a window of them cost far more than a window of memory), and a
   * small view would keep the whole channel chunk it points into alive.
   */
  private appendBacklog(c: Conn, payload: Buffer): void {
    let off = 0;
    while (off < payload.length) {
      if (!c.tail || c.tailLen === c.tail.length) {
        if (c.tail) c.backlog.push(c.tail);
        c.tail = Buffer.allocUnsafe(BACKLOG_CHUNK);
        c.tailLen = 0;
      }
      const k = payload.copy(c.tail, c.tailLen, off);
      c.tailLen += k;
      off += k;
    }
  }

  private flushBacklog(id: number, c: Conn): void {
    if (c.tail) c.backlog.push(c.tail.subarray(0, c.tailLen));
    const pieces = c.backlog;
    c.backlog = [];
    c.tail = undefined;
    c.tailLen = 0;
    if (pieces.length === 0) return;
    c.socket.cork();
    for (const p of pieces) this.writeToClient(id, c, p);
    c.socket.uncork();
  }

  private acknowledge(id: number, c: Conn): void {
    if (c.ackable === 0) return;
    const n = c.ackable;
    c.ackable = 0;
    c.held -= n;
    this.heldTotal -= n;
    const ack = Buffer.alloc(4);
    ack.writeUInt32BE(n);
    this.send(id, FrameType.ACK, ack);
  }

  private finishIfDone(id: number, c: Conn): void {
    if (c.sentFin && c.gotFin) this.forget(id);
  }

  private forget(id: number): void {
    const c = this.conns.get(id);
    if (!c) return;
    clearTimeout(c.timer);
    this.heldTotal -= c.held;
    c.held = 0;
    c.ackable = 0;
    this.conns.delete(id);
  }

  private send(id: number, type: FrameType, payload?: Buffer): void {
    if (this.closed) return;
    if (this.linkState === 'on' && this.link) {
      const header = frameHeader(id, type, payload?.length ?? 0);
      return payload && payload.length > 0 ? this.link.send(header, payload) : this.link.send(header);
    }
    // Header and payload as two writes: bulk DATA is not copied into a frame buffer first.
    this.stream.write(frameHeader(id, type, payload?.length ?? 0));
    if (payload && payload.length > 0) this.stream.write(payload);
  }

  /** The guest broke the protocol: one log line, then the channel and its connections end. */
  private violation(what: string): void {
    if (this.closed) return;
    this.log.warn(`${this.name}: the guest broke the data channel protocol (${what}); closing it and its ${this.conns.size} connection(s)`);
    this.close();
  }

  /** The VM or its channel went: every forwarded connection ends. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.decoder = new FrameDecoder(guestFrameLimit); // drops what a partial frame held
    for (const [id, c] of this.conns) {
      this.forget(id);
      c.socket.destroy();
    }
    this.pending.clear();
    for (const fn of this.closeListeners.splice(0)) fn();
    this.stream.destroy();
    this.link?.close();
  }
}
