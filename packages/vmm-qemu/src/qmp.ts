/**
 * A QMP (QEMU Machine Protocol) client over a unix socket: the greeting, capability
 * negotiation, commands, and asynchronous events.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { AegisError, LineDecoder } from '@aegis/protocol';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

interface Waiter {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** QMP commands answer in milliseconds; a migration's are polled, never waited on. */
const QMP_TIMEOUT_MS = 15_000;

export class QmpClient extends EventEmitter<{ event: [QmpEvent]; close: [] }> {
  private readonly waiters: Waiter[] = [];
  private readonly decoder = new LineDecoder(1 << 20);
  private closed = false;

  private constructor(private readonly socket: net.Socket) {
    super();
    socket.on('data', (chunk: Buffer) => this.onData(chunk));
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w.reject(new AegisError('UNAVAILABLE', 'QMP connection closed'));
      this.emit('close');
    });
    socket.on('error', () => undefined); // 'close' follows
  }

  /** Connects, retrying while QEMU has not yet created the socket, and negotiates capabilities. */
  static async connect(path: string, options: { timeoutMs: number; signal?: AbortSignal }): Promise<QmpClient> {
    const deadline = Date.now() + options.timeoutMs;
    for (;;) {
      options.signal?.throwIfAborted();
      try {
        const socket = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const client = new QmpClient(socket);
        // QEMU serves one QMP client at a time: a second one gets no greeting until the
        // first leaves, so the handshake has a deadline too.
        const timer = setTimeout(() => client.close(), Math.max(0, deadline - Date.now()));
        try {
          await client.next(); // greeting: {"QMP": {...}}
          await client.execute('qmp_capabilities');
        } catch (err) {
          client.close(); // never leave a half-open attempt holding QEMU's one QMP slot
          throw err;
        } finally {
          clearTimeout(timer);
        }
        return client;
      } catch (err) {
        if (Date.now() > deadline) {
          throw new AegisError('UNAVAILABLE', `QMP socket ${path} did not answer: ${(err as Error).message}`);
        }
        await new Promise((r) => setTimeout(r, 20));
      }
    }
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /**
   * Runs one command. A QEMU that does not answer within `timeoutMs` (frozen, SIGSTOPped) gets
   * its connection closed: replies are matched in order, so a late one could not be told
   * apart; every later call then fails at once with UNAVAILABLE instead of hanging too.
   */
  async execute(command: string, args?: Record<string, unknown>, timeoutMs = QMP_TIMEOUT_MS): Promise<unknown> {
    if (this.closed) throw new AegisError('UNAVAILABLE', 'QMP connection closed');
    const reply = this.next();
    this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.close();
        reject(new AegisError('TIMEOUT', `QEMU did not answer ${command} within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    const r = (await Promise.race([reply, late]).finally(() => clearTimeout(timer))) as {
      return?: unknown;
      error?: { class: string; desc: string };
    };
    if (r.error) throw new AegisError('INTERNAL', `QMP ${command} failed: ${r.error.class}: ${r.error.desc}`);
    return r.return;
  }

  close(): void {
    this.socket.destroy();
  }

  private next(): Promise<unknown> {
    return new Promise((resolve, reject) => {
      if (this.closed) reject(new AegisError('UNAVAILABLE', 'QMP connection closed'));
      else this.waiters.push({ resolve, reject });
    });
  }

  private onData(chunk: Buffer): void {
    for (const line of this.decoder.push(chunk).lines) {
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        continue;
      }
      if (typeof msg['event'] === 'string') {
        this.emit('event', msg as unknown as QmpEvent);
      } else {
        // QMP answers commands strictly in order, so replies match waiters FIFO.
        this.waiters.shift()?.resolve(msg);
      }
    }
  }
}
