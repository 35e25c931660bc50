/**
 * The host end of one VM's agent channel: a typed JSON-RPC client of the harness. Every
 * notification and result from the guest is parsed by the contract's parsers before use:
 * the guest is untrusted.
 */
import type { Duplex } from 'node:stream';
import {
  AegisError,
  RpcPeer,
  isGuestEvent,
  parseEvent,
  parseResult,
  type GuestEvents,
  type GuestMethod,
  type GuestMethods,
} from '@aegis/protocol';

export type AgentEventHandler = <E extends keyof GuestEvents>(event: E, params: GuestEvents[E]) => void;

export class AgentConnection {
  private readonly peer: RpcPeer;
  readonly closed: Promise<void>;
  private sawReady!: () => void;
  private readonly ready = new Promise<void>((r) => (this.sawReady = r));

  constructor(
    private readonly stream: Duplex,
    onEvent: AgentEventHandler,
    onProtocolError: (err: AegisError) => void,
  ) {
    this.peer = new RpcPeer({
      send: (line) => {
        if (!stream.destroyed) stream.write(line);
      },
      onNotification: (method, params) => {
        if (!isGuestEvent(method)) return onProtocolError(new AegisError('INVALID_ARGUMENT', `unknown guest event ${method}`));
        try {
          // A switch keeps each event's parser and type together.
          switch (method) {
            case 'ready':
              this.sawReady();
              return onEvent('ready', parseEvent.ready(params));
            case 'output':
              return onEvent('output', parseEvent.output(params));
            case 'exit':
              return onEvent('exit', parseEvent.exit(params));
            case 'execExit':
              return onEvent('execExit', parseEvent.execExit(params));
          }
        } catch (err) {
          onProtocolError(AegisError.from(err, 'INVALID_ARGUMENT'));
        }
      },
      onProtocolError,
    });
    stream.on('data', (chunk: Buffer) => this.peer.receive(chunk));
    this.closed = new Promise((resolve) => {
      stream.once('close', () => {
        this.peer.close(new AegisError('UNAVAILABLE', 'agent channel closed'));
        resolve();
      });
    });
    stream.on('error', () => undefined); // 'close' follows
  }

  async call<M extends GuestMethod>(
    method: M,
    params: GuestMethods[M]['params'],
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<GuestMethods[M]['result']> {
    const raw = await this.peer.request(method, params, options);
    try {
      return parseResult[method](raw);
    } catch (err) {
      throw new AegisError('INTERNAL', `guest sent a malformed ${method} result: ${(err as Error).message}`);
    }
  }

  /**
   * Waits until the harness is there: its `ready` notification (sent once, at its start) or
   * an answer to `health`, which is re-sent because a request that reaches the port before
   * the guest opened it may be lost, and a daemon that reconnects never sees `ready`.
   */
  async waitReady(timeoutMs: number, signal?: AbortSignal): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let ready = false;
    void this.ready.then(() => (ready = true));
    const polling = (async (): Promise<void> => {
      while (!ready) {
        signal?.throwIfAborted();
        const left = deadline - Date.now();
        if (left <= 0) throw new AegisError('TIMEOUT', `the guest agent did not answer within ${timeoutMs} ms`);
        try {
          await this.call('health', {}, { timeoutMs: Math.min(50, left), ...(signal ? { signal } : {}) });
          return;
        } catch (err) {
          if (!(err instanceof AegisError) || err.code !== 'TIMEOUT') throw err;
        }
      }
    })();
    await Promise.race([this.ready, polling]);
  }

  close(): void {
    this.stream.destroy();
  }
}
