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

  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.closed) throw new AegisError('UNAVAILABLE', 'QMP connection closed');
    const reply = this.next();
    this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    const r = (await reply) as { return?: unknown; error?: { class: string; desc: string } };
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
