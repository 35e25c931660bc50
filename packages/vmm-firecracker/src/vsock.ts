/**
 * Host-initiated vsock connections through Firecracker's unix-socket backend: connect to the
 * device's `uds_path`, send `CONNECT <port>\n`, and Firecracker answers `OK <host port>\n` once
 * the guest has accepted on that vsock port (it closes the connection when nothing listens).
 * After the OK line the socket is a plain byte stream to the guest.
 */
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';

/** Longer than any OK line; a peer that sends more without a newline is not Firecracker. */
const MAX_HANDSHAKE_BYTES = 64;

export interface VsockConnectOptions {
  signal?: AbortSignal;
  /** For one attempt, connect plus handshake. Default 5 s. */
  timeoutMs?: number;
}

/** One attempt. UNAVAILABLE when the socket is missing or the guest does not accept. */
export function connectVsock(udsPath: string, port: number, options: VsockConnectOptions = {}): Promise<Duplex> {
  const what = `vsock port ${port} via ${udsPath}`;
  return new Promise((resolve, reject) => {
    if (options.signal?.aborted) {
      reject(new AegisError('CANCELLED', `connecting to ${what} cancelled`));
      return;
    }
    const socket = net.connect(udsPath);
    let received = Buffer.alloc(0);
    let settled = false;
    const finish = (err: AegisError | undefined): void => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      options.signal?.removeEventListener('abort', onAbort);
      socket.removeListener('readable', onReadable);
      socket.removeListener('error', onError);
      socket.removeListener('end', onEnd);
      if (err) {
        socket.destroy();
        reject(err);
      } else {
        resolve(socket);
      }
    };
    const onAbort = (): void => finish(new AegisError('CANCELLED', `connecting to ${what} cancelled`));
    const onError = (err: Error): void => finish(new AegisError('UNAVAILABLE', `${what}: ${err.message}`, { cause: err }));
    const onEnd = (): void => finish(new AegisError('UNAVAILABLE', `${what}: closed before OK (is the guest listening on port ${port}?)`));
    // Paused-mode reads: nothing is consumed past what we look at, and once our listener is gone
    // the stream is back to its initial state, so the caller's 'data' listener starts the flow.
    const onReadable = (): void => {
      let chunk: Buffer | null;
      while (!settled && (chunk = socket.read() as Buffer | null) !== null) {
        received = Buffer.concat([received, chunk]);
        const nl = received.indexOf(0x0a);
        if (nl < 0) {
          if (received.length > MAX_HANDSHAKE_BYTES) finish(new AegisError('UNAVAILABLE', `${what}: no OK line in the handshake`));
          continue;
        }
        const line = received.subarray(0, nl).toString('latin1').trim();
        if (!/^OK \d+$/.test(line)) {
          finish(new AegisError('UNAVAILABLE', `${what}: unexpected handshake answer ${JSON.stringify(line.slice(0, 40))}`));
          return;
        }
        const rest = received.subarray(nl + 1);
        // Our listener goes first: unshift makes the stream readable again.
        finish(undefined);
        if (rest.length > 0) socket.unshift(rest);
        return;
      }
    };
    const timeoutMs = options.timeoutMs ?? 5000;
    const timer = setTimeout(() => finish(new AegisError('UNAVAILABLE', `${what}: no handshake answer within ${timeoutMs} ms`)), timeoutMs);
    options.signal?.addEventListener('abort', onAbort, { once: true });
    socket.on('error', onError);
    socket.on('end', onEnd);
    socket.once('connect', () => {
      socket.on('readable', onReadable);
      socket.write(`CONNECT ${port}\n`);
    });
  });
}
