/**
 * `--expose`: host ports that forward into an instance over its data channel. Listeners are
 * bound before the VM boots (a taken port fails the start with nothing left behind), live as
 * long as the instance runs, and are bound again by a restarted aegisd. Each accepted
 * connection is spliced (data-channel.ts) to one aegis-init opens to 127.0.0.1:<guest port>.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import { DataChannel, type EgressHandler } from './data-channel.js';
import { duplexPair } from './duplex-pair.js';

/** A forwarded port as the API shows it; `hostPort` 0 on request means any free port (the chosen one is recorded). */
export type PortMapping = ApiSchemas['PortMapping'];

/** A file-service connection (port 0) not open by then is given up, and tried once more by the caller. */
const FILE_SERVICE_OPEN_TIMEOUT_MS = 5000;

/** What the instance's owner hears about its connections (`--idle-pause`). */
export interface ForwardHooks {
  /** Before an accepted connection is forwarded (it stays paused meanwhile); a rejection refuses it. */
  admit?: () => Promise<void>;
  /** Bytes went through a connection, the host's (`fromHost`) or the guest's. */
  traffic?: (fromHost: boolean) => void;
  /** The guest's own connections and DNS (a `user`-network instance): the channel is then opened at once, and again if it closes. */
  egress?: EgressHandler;
}

/** What `serve`'s `connect` opens: the VM's data channel, and its packet link where the VM has one. */
export interface DataStreams {
  stream: Duplex;
  link?: Duplex | undefined;
}

export class PortForwarder {
  private connect: (() => Promise<DataStreams>) | undefined;
  private channel: Promise<DataChannel> | undefined;
  private closed = false;
  private onError: ((err: Error) => void) | undefined;
  private hooks: ForwardHooks = {};

  private constructor(
    private readonly servers: net.Server[],
    readonly mappings: PortMapping[],
  ) {}

  /** Binds every mapping or none: ALREADY_EXISTS when a host port is taken. */
  static async listen(requested: PortMapping[]): Promise<PortForwarder> {
    const servers: net.Server[] = [];
    const bound: PortMapping[] = [];
    // Exists from the start so the first listener's error handler has somewhere to report.
    const forwarder = new PortForwarder(servers, bound);
    try {
      for (const m of requested) {
        const server = net.createServer({ pauseOnConnect: true });
        await new Promise<void>((resolve, reject) => {
          const onListenError = (err: NodeJS.ErrnoException): void => {
            if (err.code === 'EADDRINUSE') {
              reject(
                new AegisError(
                  'ALREADY_EXISTS',
                  `host port ${m.hostIp}:${m.hostPort} is already in use; pick another or omit it to get a free one`,
                ),
              );
            } else if (err.code === 'EADDRNOTAVAIL') {
              reject(new AegisError('INVALID_ARGUMENT', `${m.hostIp} is not an address of this host`));
            } else if (err.code === 'EACCES') {
              reject(new AegisError('FAILED_PRECONDITION', `binding ${m.hostIp}:${m.hostPort} needs privileges aegisd does not have`));
            } else reject(err);
          };
          server.once('error', onListenError);
          server.listen({ host: m.hostIp, port: m.hostPort, exclusive: true }, () => {
            server.off('error', onListenError);
            resolve();
          });
        });
        // A listening server's errors come from accept (EMFILE, ENFILE, ENOBUFS, ...): pending
        // connections were dropped, but the listener is intact and libuv keeps accepting. With
        // no handler Node throws them and takes down aegisd with every instance's ports; closing
        // the listener would turn a transient shortage into a port that is gone until the
        // instance restarts. So it stays up, and the error goes only to whoever asked.
        server.on('error', (err: Error) => forwarder.onError?.(err));
        servers.push(server);
        bound.push({ ...m, hostPort: (server.address() as net.AddressInfo).port });
      }
    } catch (err) {
      for (const s of servers) s.close();
      throw err;
    }
    return forwarder;
  }

  /**
   * Starts accepting; each connection goes over the VM's data channel, which `connect` opens
   * on first use (and again if it closed, e.g. after a daemon restart). `onError` hears about
   * errors of the listeners, which keep listening through them; `hooks` hears about connections.
   */
  serve(connect: () => Promise<DataStreams>, onError?: (err: Error) => void, hooks: ForwardHooks = {}): void {
    this.connect = connect;
    this.onError = onError;
    this.hooks = hooks;
    this.servers.forEach((server, i) => {
      const m = this.mappings[i];
      if (!m) return;
      server.on('connection', (socket: net.Socket) => void this.forward(socket, m.guestPort));
    });
    if (hooks.egress) this.keepOpen();
  }

  /**
   * The guest may start a connection at any time, so a policy-carrying channel is connected at
   * once and reconnected if it closes while the VM runs (as after an aegisd restart).
   */
  private keepOpen(retryMs = 100): void {
    if (this.closed) return;
    const openedAt = Date.now();
    // A channel that closes at once again and again (a guest breaking the protocol) is retried
    // less and less often, up to every 5 s; one that lived is reopened at once.
    const next = (): number => (Date.now() - openedAt > 5_000 ? 100 : Math.min(retryMs * 2, 5_000));
    this.dataChannel().then(
      (ch) => ch.onClose(() => setTimeout(() => this.keepOpen(next()), retryMs)),
      () => setTimeout(() => this.keepOpen(next()), retryMs),
    );
  }

  private async forward(socket: net.Socket, guestPort: number): Promise<void> {
    socket.on('error', () => socket.destroy());
    try {
      await this.hooks.admit?.();
      if (socket.destroyed) return;
      (await this.dataChannel()).forward(socket, guestPort);
    } catch {
      socket.destroy();
    }
  }

  /**
   * A connection of the daemon's own to `guestPort` over the same data channel (port 0: the
   * harness's file service): the returned stream is the guest end's bytes.
   */
  async open(guestPort: number): Promise<Duplex> {
    const channel = await this.dataChannel();
    const [mine, theirs] = duplexPair();
    mine.pause(); // as an accepted socket: the channel resumes it once the guest end is open
    // The file service is local to the guest and opens in milliseconds: not a TCP connect's patience.
    channel.forward(mine, guestPort, guestPort === 0 ? FILE_SERVICE_OPEN_TIMEOUT_MS : undefined);
    return theirs;
  }

  private dataChannel(): Promise<DataChannel> {
    if (this.closed) return Promise.reject(new AegisError('UNAVAILABLE', 'instance is gone'));
    if (!this.channel) {
      const connect = this.connect;
      if (!connect) return Promise.reject(new AegisError('UNAVAILABLE', 'not serving yet'));
      const pending = connect().then(({ stream, link }) => {
        const ch = new DataChannel(stream, {
          onTraffic: (fromHost) => this.hooks.traffic?.(fromHost),
          ...(this.hooks.egress ? { egress: this.hooks.egress } : {}),
          ...(link ? { link } : {}),
        });
        stream.once('close', () => {
          if (this.channel === pending) this.channel = undefined;
        });
        if (this.closed) ch.close();
        return ch;
      });
      pending.catch(() => {
        if (this.channel === pending) this.channel = undefined;
      });
      this.channel = pending;
    }
    return this.channel;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    for (const s of this.servers) s.close();
    void this.channel?.then(
      (ch) => ch.close(),
      () => undefined,
    );
    this.channel = undefined;
  }
}
