/**
 * The host end of one VM's agent channel: a typed JSON-RPC client of the harness. Every
 * notification and result from the guest is parsed by the contract's parsers before use:
 * the guest is untrusted. So is its text: whatever of it reaches an error message passes
 * through `escapeForLog` first. A guest that keeps sending what the contract does not allow
 * (malformed lines, unknown events, requests of its own) has its channel closed.
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
import { escapeForLog } from '../log.js';

export type AgentEventHandler = <E extends keyof GuestEvents>(event: E, params: GuestEvents[E]) => void;

/**
 * The longest line taken from the guest: an `output` notification carries up to 16 MiB of
 * base64 (guest.ts), and its envelope must fit around it. Longer lines are dropped unread.
 */
export const AGENT_MAX_LINE_BYTES = 24 * 1024 * 1024;
/** Protocol errors one connection may make; the next one closes the channel. */
export const AGENT_MAX_PROTOCOL_ERRORS = 100;
/** Protocol errors reported one by one (enough to diagnose a broken harness); later ones only count. */
export const AGENT_REPORTED_PROTOCOL_ERRORS = 5;
/** Longest guest-influenced error text passed on (escaped), for a log line or an API error. */
const MAX_REPORTED_CHARS = 200;
const MAX_CALL_ERROR_CHARS = 2000;

export class AgentConnection {
  private readonly peer: RpcPeer;
  readonly closed: Promise<void>;
  private sawReady!: () => void;
  private readonly ready = new Promise<void>((r) => (this.sawReady = r));
  private protocolErrors = 0;
  private condemned = false;

  /**
   * `onProtocolError` hears about the first few bad messages, with any guest text escaped and
   * cut short, and then once more when the channel is closed for too many of them.
   */
  constructor(
    private readonly stream: Duplex,
    private onEvent: AgentEventHandler,
    private onProtocolError: (err: AegisError) => void,
  ) {
    this.peer = new RpcPeer({
      maxLineBytes: AGENT_MAX_LINE_BYTES,
      send: (line) => {
        if (!stream.destroyed) stream.write(line);
      },
      onNotification: (method, params) => {
        if (this.condemned) return;
        if (!isGuestEvent(method)) return this.protocolError(new AegisError('INVALID_ARGUMENT', `unknown guest event ${method}`));
        try {
          // A switch keeps each event's parser and type together.
          switch (method) {
            case 'ready':
              this.sawReady();
              return this.onEvent('ready', parseEvent.ready(params));
            case 'output':
              return this.onEvent('output', parseEvent.output(params));
            case 'exit':
              return this.onEvent('exit', parseEvent.exit(params));
            case 'execExit':
              return this.onEvent('execExit', parseEvent.execExit(params));
          }
        } catch (err) {
          this.protocolError(AegisError.from(err, 'INVALID_ARGUMENT'), `bad ${method} event: `);
        }
      },
      // The host is the only caller on this channel.
      onRequest: (method) => {
        this.protocolError(new AegisError('UNSUPPORTED', `the guest sent a request (${method})`));
        return Promise.reject(new AegisError('UNSUPPORTED', 'the host serves no requests'));
      },
      onProtocolError: (err) => this.protocolError(err),
    });
    stream.on('data', (chunk: Buffer) => {
      if (!this.condemned) this.peer.receive(chunk);
    });
    this.closed = new Promise((resolve) => {
      stream.once('close', () => {
        this.peer.close(new AegisError('UNAVAILABLE', 'agent channel closed'));
        resolve();
      });
    });
    stream.on('error', () => undefined); // 'close' follows
  }

  /**
   * Gives the channel to a new owner (a VM taken from the warm pool becomes an instance's):
   * events and protocol errors go to it from now on, with no line lost in between.
   */
  handOver(onEvent: AgentEventHandler, onProtocolError: (err: AegisError) => void): void {
    this.onEvent = onEvent;
    this.onProtocolError = onProtocolError;
  }

  /**
   * True once the channel was closed because the guest broke the protocol too often: its
   * owner should not take that for a transient drop (reconnecting invites the same again).
   */
  get closedForProtocolErrors(): boolean {
    return this.condemned;
  }

  async call<M extends GuestMethod>(
    method: M,
    params: GuestMethods[M]['params'],
    options: { timeoutMs?: number; signal?: AbortSignal } = {},
  ): Promise<GuestMethods[M]['result']> {
    let raw: unknown;
    try {
      raw = await this.peer.request(method, params, options);
    } catch (err) {
      // An error the guest answered with carries its text: escaped before it goes anywhere.
      const e = AegisError.from(err);
      throw new AegisError(e.code, escapeForLog(e.message, MAX_CALL_ERROR_CHARS));
    }
    try {
      return parseResult[method](raw);
    } catch (err) {
      this.protocolError(AegisError.from(err, 'INVALID_ARGUMENT'), '', false);
      throw new AegisError('INTERNAL', `guest sent a malformed ${method} result: ${escapeForLog((err as Error).message)}`);
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

  /**
   * Stops reading the channel (a consumer of the guest's output is congested): the bytes wait
   * in the transport, the harness's writes back up, and it pauses the processes' pipes. The
   * channel is one ordered stream, so answers to calls wait too until `resume`.
   */
  pause(): void {
    this.stream.pause();
  }

  resume(): void {
    this.stream.resume();
  }

  close(): void {
    this.stream.destroy();
  }

  /**
   * Counts a protocol error; reports the first few (escaped: their text may be the guest's),
   * and at AGENT_MAX_PROTOCOL_ERRORS closes the channel and reports that, once.
   */
  private protocolError(err: AegisError, prefix = '', report = true): void {
    if (this.condemned) return;
    this.protocolErrors++;
    if (this.protocolErrors >= AGENT_MAX_PROTOCOL_ERRORS) {
      this.condemned = true;
      this.onProtocolError(
        new AegisError(
          'RESOURCE_EXHAUSTED',
          `${this.protocolErrors} bad messages from the guest (last: ${escapeForLog(prefix + err.message, MAX_REPORTED_CHARS)}); closing the agent channel`,
        ),
      );
      this.stream.destroy();
      return;
    }
    if (report && this.protocolErrors <= AGENT_REPORTED_PROTOCOL_ERRORS) {
      const more = this.protocolErrors === AGENT_REPORTED_PROTOCOL_ERRORS ? ' (further bad messages are counted, not reported)' : '';
      this.onProtocolError(new AegisError(err.code, escapeForLog(prefix + err.message, MAX_REPORTED_CHARS) + more));
    }
  }
}
