/**
 * A small client of Firecracker's REST API (swagger `src/firecracker/swagger/firecracker.yaml`,
 * read at API version 1.17.0-dev; every request used here is in the v1.x API): HTTP/1.1 with
 * JSON bodies over the unix socket given by `--api-sock`. Success is 204 No Content (200 with
 * a body for GETs); a failure carries `{"fault_message": "..."}`.
 */
import http from 'node:http';
import { AegisError } from '@aegis/protocol';

export type ApiMethod = 'GET' | 'PUT' | 'PATCH';

export interface ApiCallOptions {
  signal?: AbortSignal;
  /** Default 10 s; snapshots of large guests take longer and say so. */
  timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 10_000;

export class FirecrackerApi {
  constructor(readonly socketPath: string) {}

  get(path: string, options?: ApiCallOptions): Promise<unknown> {
    return this.request('GET', path, undefined, options);
  }

  put(path: string, body: unknown, options?: ApiCallOptions): Promise<unknown> {
    return this.request('PUT', path, body, options);
  }

  patch(path: string, body: unknown, options?: ApiCallOptions): Promise<unknown> {
    return this.request('PATCH', path, body, options);
  }

  /**
   * One request on its own connection (Firecracker's API server handles one at a time anyway).
   * A 400 means Firecracker refused the input or the state (INVALID_ARGUMENT); any other
   * failure, including no answer at all, means it could not do it (UNAVAILABLE).
   */
  request(method: ApiMethod, path: string, body?: unknown, options: ApiCallOptions = {}): Promise<unknown> {
    const what = `Firecracker ${method} ${path}`;
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      if (options.signal?.aborted) {
        reject(new AegisError('CANCELLED', `${what} cancelled`));
        return;
      }
      let settled = false;
      const finish = (err: AegisError | undefined, value?: unknown): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        options.signal?.removeEventListener('abort', onAbort);
        if (err) reject(err);
        else resolve(value);
      };
      const req = http.request(
        {
          socketPath: this.socketPath,
          method,
          path,
          // Firecracker's micro-http wants a Host header like any HTTP/1.1 server; the value is unused.
          headers: {
            Host: 'localhost',
            Accept: 'application/json',
            ...(payload ? { 'Content-Type': 'application/json', 'Content-Length': payload.length } : {}),
          },
          agent: false,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on('data', (c: Buffer) => chunks.push(c));
          res.on('error', (err) => finish(new AegisError('UNAVAILABLE', `${what}: ${err.message}`)));
          res.on('end', () => {
            const status = res.statusCode ?? 0;
            const text = Buffer.concat(chunks).toString('utf8');
            if (status >= 200 && status < 300) {
              if (text.trim() === '') return finish(undefined, undefined);
              try {
                return finish(undefined, JSON.parse(text) as unknown);
              } catch {
                return finish(new AegisError('UNAVAILABLE', `${what}: answer is not JSON (status ${status})`));
              }
            }
            finish(new AegisError(status === 400 ? 'INVALID_ARGUMENT' : 'UNAVAILABLE', `${what}: ${faultMessage(text, status)}`));
          });
        },
      );
      const onAbort = (): void => {
        req.destroy();
        finish(new AegisError('CANCELLED', `${what} cancelled`));
      };
      options.signal?.addEventListener('abort', onAbort, { once: true });
      const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
      const timer = setTimeout(() => {
        req.destroy();
        finish(new AegisError('UNAVAILABLE', `${what}: no answer within ${timeoutMs} ms`));
      }, timeoutMs);
      req.on('error', (err) => finish(new AegisError('UNAVAILABLE', `${what}: ${err.message}`, { cause: err })));
      req.end(payload);
    });
  }
}

/** The `fault_message` of Firecracker's error body, or what there is instead. */
function faultMessage(text: string, status: number): string {
  try {
    const parsed = JSON.parse(text) as unknown;
    if (typeof parsed === 'object' && parsed !== null) {
      const fault = (parsed as Record<string, unknown>)['fault_message'];
      if (typeof fault === 'string' && fault !== '') return fault;
    }
  } catch {
    // not JSON: fall through
  }
  const trimmed = text.trim().slice(0, 200);
  return trimmed ? `status ${status}: ${trimmed}` : `status ${status}`;
}
