/**
 * `--expose`: host ports that forward into an instance over its agent channel. Listeners are
 * bound before the VM boots (a taken port fails the start with nothing left behind), live as
 * long as the instance runs, and are bound again by a restarted aegisd. Each accepted
 * connection becomes a TcpRelay paired with one the harness opens to 127.0.0.1:<guest port>.
 */
import net from 'node:net';
import { AegisError, TcpRelay, type GuestEvents } from '@aegis/protocol';
import type { AgentConnection } from '../instances/agent.js';

export interface PortMapping {
  guestPort: number;
  /** 0 on request: any free port (the chosen one is recorded). */
  hostPort: number;
  hostIp: string;
  protocol: 'tcp';
}

export class PortForwarder {
  private readonly relays = new Map<number, TcpRelay>();
  private nextConnId = 1;

  private constructor(
    private readonly servers: net.Server[],
    readonly mappings: PortMapping[],
  ) {}

  /** Binds every mapping or none: ALREADY_EXISTS when a host port is taken. */
  static async listen(requested: PortMapping[]): Promise<PortForwarder> {
    const servers: net.Server[] = [];
    const bound: PortMapping[] = [];
    try {
      for (const m of requested) {
        const server = net.createServer({ pauseOnConnect: true });
        await new Promise<void>((resolve, reject) => {
          server.once('error', (err: NodeJS.ErrnoException) => {
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
          });
          server.listen({ host: m.hostIp, port: m.hostPort, exclusive: true }, () => resolve());
        });
        servers.push(server);
        bound.push({ ...m, hostPort: (server.address() as net.AddressInfo).port });
      }
    } catch (err) {
      for (const s of servers) s.close();
      throw err;
    }
    return new PortForwarder(servers, bound);
  }

  /** Starts accepting; each connection is forwarded through the agent `agent()` returns now. */
  serve(agent: () => AgentConnection | undefined): void {
    this.servers.forEach((server, i) => {
      const m = this.mappings[i];
      if (!m) return;
      server.on('connection', (socket: net.Socket) => void this.forward(socket, m.guestPort, agent()));
    });
  }

  private async forward(socket: net.Socket, guestPort: number, agent: AgentConnection | undefined): Promise<void> {
    socket.on('error', () => socket.destroy());
    if (!agent) return void socket.destroy();
    const connId = this.nextConnId++;
    const relay = new TcpRelay(
      connId,
      socket,
      (event, params) => agent.notify(event, params),
      () => this.relays.delete(connId),
    );
    this.relays.set(connId, relay);
    try {
      // As patient as a TCP connect: a guest server with a short accept queue (python's
      // http.server listens with a backlog of 5) leaves SYNs to be retried for many seconds.
      await agent.call('tcpOpen', { connId, port: guestPort }, { timeoutMs: 75_000 });
      socket.setNoDelay(true);
      socket.resume();
    } catch {
      // Nothing listens in the guest yet: the client sees the connection closed, as with Docker.
      relay.destroy();
    }
  }

  /** Data-plane notifications from the guest. */
  guestEvent<E extends 'tcpData' | 'tcpAck' | 'tcpClose'>(event: E, params: GuestEvents[E]): void {
    const relay = this.relays.get(params.connId);
    if (!relay) return;
    if (event === 'tcpData') relay.data((params as GuestEvents['tcpData']).data);
    else if (event === 'tcpAck') relay.ack((params as GuestEvents['tcpAck']).bytes);
    else relay.remoteClosed();
  }

  close(): void {
    for (const s of this.servers) s.close();
    for (const r of this.relays.values()) r.destroy();
    this.relays.clear();
  }
}
