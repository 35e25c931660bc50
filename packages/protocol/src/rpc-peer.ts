/**
 * One end of a JSON-RPC 2.0 conversation, independent of transport: the owner feeds received
 * bytes to `receive` and supplies `send` for outgoing lines. Used by the harness (serving
 * requests) and by the daemon (calling them).
 */
import { AegisError } from './errors.js';
import {
  LineDecoder,
  encode,
  errorFromFailure,
  failure,
  isNotification,
  isRequest,
  notification,
  parseMessage,
  request,
  success,
  RPC_PARSE_ERROR,
  type RpcId,
  type RpcMessage,
} from './jsonrpc.js';

export type RequestHandler = (method: string, params: unknown) => Promise<unknown>;
export type NotificationHandler = (method: string, params: unknown) => void;

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: AegisError) => void;
  cleanup: () => void;
}

export interface RpcPeerOptions {
  send: (line: string) => void;
  onRequest?: RequestHandler;
  onNotification?: NotificationHandler;
  /** Called for bytes that were not JSON-RPC; the peer keeps going. */
  onProtocolError?: (err: AegisError) => void;
  maxLineBytes?: number;
}

export class RpcPeer {
  /**
   * Ids start at a random point: a peer restored from a snapshot may still send answers to a
   * previous connection's requests, and those must not match ours.
   */
  private nextId = Math.floor(Math.random() * 2 ** 31);
  private readonly pending = new Map<RpcId, Pending>();
  private readonly decoder: LineDecoder;
  private closedWith: AegisError | undefined;

  constructor(private readonly opts: RpcPeerOptions) {
    this.decoder = new LineDecoder(opts.maxLineBytes);
  }

  receive(chunk: Buffer): void {
    const { lines, oversized } = this.decoder.push(chunk);
    if (oversized > 0) this.protocolError(new AegisError('INVALID_ARGUMENT', `${oversized} oversized line(s) dropped`));
    for (const line of lines) {
      if (line.trim() === '') continue;
      let msg: RpcMessage;
      try {
        msg = parseMessage(JSON.parse(line));
      } catch (err) {
        const e = AegisError.from(err, 'INVALID_ARGUMENT');
        this.protocolError(e);
        // A request we cannot parse still deserves an answer, per JSON-RPC.
        this.opts.send(encode({ jsonrpc: '2.0', id: null, error: { code: RPC_PARSE_ERROR, message: e.message, data: e.toWire() } }));
        continue;
      }
      this.dispatch(msg);
    }
  }

  request(method: string, params?: unknown, options: { timeoutMs?: number; signal?: AbortSignal } = {}): Promise<unknown> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = (): void => {
        this.pending.delete(id);
        cleanup();
        reject(new AegisError('CANCELLED', `${method} was cancelled`));
      };
      const cleanup = (): void => {
        if (timer) clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
      };
      if (options.timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.pending.delete(id);
          cleanup();
          reject(new AegisError('TIMEOUT', `guest did not answer ${method} within ${options.timeoutMs} ms`));
        }, options.timeoutMs);
      }
      if (options.signal) {
        if (options.signal.aborted) return onAbort();
        options.signal.addEventListener('abort', onAbort, { once: true });
      }
      this.pending.set(id, { resolve, reject, cleanup });
      this.opts.send(encode(request(id, method, params)));
    });
  }

  notify(method: string, params?: unknown): void {
    this.opts.send(encode(notification(method, params)));
  }

  /** Fails every pending request; later requests fail at once with the same error. */
  close(err: AegisError): void {
    this.closedWith = err;
    for (const p of this.pending.values()) {
      p.cleanup();
      p.reject(err);
    }
    this.pending.clear();
  }

  private dispatch(msg: RpcMessage): void {
    if (isRequest(msg)) {
      const handler = this.opts.onRequest;
      if (!handler) {
        this.opts.send(encode(failure(msg.id, new AegisError('UNSUPPORTED', `method ${msg.method} not served here`))));
        return;
      }
      // A handler that throws synchronously must still answer, not take the peer down.
      Promise.resolve()
        .then(() => handler(msg.method, msg.params))
        .then(
          (result) => this.opts.send(encode(success(msg.id, result))),
          (err: unknown) => this.opts.send(encode(failure(msg.id, AegisError.from(err)))),
        );
      return;
    }
    if (isNotification(msg)) {
      this.opts.onNotification?.(msg.method, msg.params);
      return;
    }
    if (msg.id === null) {
      if ('error' in msg) this.protocolError(errorFromFailure(msg.error));
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) return; // a late answer to a request that timed out
    this.pending.delete(msg.id);
    p.cleanup();
    if ('error' in msg) p.reject(errorFromFailure(msg.error));
    else p.resolve(msg.result);
  }

  private protocolError(err: AegisError): void {
    this.opts.onProtocolError?.(err);
  }
}
