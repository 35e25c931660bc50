/**
 * JSON-RPC 2.0 envelopes and newline-delimited framing. No I/O here: callers feed bytes in
 * and get messages out, so the same code runs in the guest and on the host.
 */
import { AegisError, ERROR_CODES, isErrorCode, type ErrorCode, type WireError } from './errors.js';

export type RpcId = number | string;

export interface RpcRequest {
  jsonrpc: '2.0';
  id: RpcId;
  method: string;
  params?: unknown;
}

export interface RpcNotification {
  jsonrpc: '2.0';
  method: string;
  params?: unknown;
}

export interface RpcSuccess {
  jsonrpc: '2.0';
  id: RpcId;
  result: unknown;
}

export interface RpcFailure {
  jsonrpc: '2.0';
  id: RpcId | null;
  error: { code: number; message: string; data?: WireError };
}

export type RpcMessage = RpcRequest | RpcNotification | RpcSuccess | RpcFailure;

/** Spec-defined codes for envelopes that could not be understood at all. */
export const RPC_PARSE_ERROR = -32700;
export const RPC_INVALID_REQUEST = -32600;
export const RPC_METHOD_NOT_FOUND = -32601;

export function request(id: RpcId, method: string, params?: unknown): RpcRequest {
  return params === undefined ? { jsonrpc: '2.0', id, method } : { jsonrpc: '2.0', id, method, params };
}

export function notification(method: string, params?: unknown): RpcNotification {
  return params === undefined ? { jsonrpc: '2.0', method } : { jsonrpc: '2.0', method, params };
}

export function success(id: RpcId, result: unknown): RpcSuccess {
  return { jsonrpc: '2.0', id, result: result ?? null };
}

/** tRPC's shape: a spec-range number in `error.code`, our string code in `error.data.code`. */
export function failure(id: RpcId | null, err: AegisError): RpcFailure {
  return {
    jsonrpc: '2.0',
    id,
    error: { code: ERROR_CODES[err.code].rpcCode, message: err.message, data: err.toWire() },
  };
}

export function errorFromFailure(f: RpcFailure['error']): AegisError {
  const data = f.data as unknown;
  if (typeof data === 'object' && data !== null && isErrorCode((data as { code?: unknown }).code)) {
    return AegisError.fromWire(data, f.message);
  }
  const byNumber = (Object.entries(ERROR_CODES) as [ErrorCode, { rpcCode: number }][]).find(([, v]) => v.rpcCode === f.code);
  return new AegisError(byNumber?.[0] ?? 'UNKNOWN', f.message);
}

/**
 * Classifies one decoded JSON value. Anything that is not a well-formed envelope throws
 * INVALID_ARGUMENT: the peer is untrusted and its bytes are checked before use.
 */
export function parseMessage(value: unknown): RpcMessage {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new AegisError('INVALID_ARGUMENT', 'JSON-RPC message must be an object');
  }
  const m = value as Record<string, unknown>;
  if (m['jsonrpc'] !== '2.0') throw new AegisError('INVALID_ARGUMENT', 'jsonrpc must be "2.0"');
  const id = m['id'];
  const idOk = typeof id === 'number' || typeof id === 'string';
  if (typeof m['method'] === 'string') {
    if (id === undefined) return m as unknown as RpcNotification;
    if (idOk) return m as unknown as RpcRequest;
    throw new AegisError('INVALID_ARGUMENT', 'request id must be a number or string');
  }
  if ('result' in m && idOk) return m as unknown as RpcSuccess;
  if ('error' in m && (idOk || id === null)) {
    const e = m['error'];
    if (typeof e === 'object' && e !== null && typeof (e as { code?: unknown }).code === 'number') {
      const msg = (e as { message?: unknown }).message;
      return {
        jsonrpc: '2.0',
        id: id as RpcId | null,
        error: {
          code: (e as { code: number }).code,
          message: typeof msg === 'string' ? msg : 'error',
          data: (e as { data?: WireError }).data,
        },
      };
    }
  }
  throw new AegisError('INVALID_ARGUMENT', 'not a JSON-RPC 2.0 request, notification or response');
}

export function isRequest(m: RpcMessage): m is RpcRequest {
  return 'method' in m && 'id' in m;
}
export function isNotification(m: RpcMessage): m is RpcNotification {
  return 'method' in m && !('id' in m);
}
export function isResponse(m: RpcMessage): m is RpcSuccess | RpcFailure {
  return !('method' in m);
}

export function encode(message: RpcMessage): string {
  return JSON.stringify(message) + '\n';
}

/**
 * Splits a byte stream into lines. A line longer than `maxLineBytes` is dropped and
 * reported, so a misbehaving peer cannot make us buffer without bound.
 */
export class LineDecoder {
  private parts: Buffer[] = [];
  private size = 0;
  private discarding = false;

  constructor(private readonly maxLineBytes = 8 * 1024 * 1024) {}

  /** Returns complete lines; `oversized` counts lines thrown away for length. */
  push(chunk: Buffer): { lines: string[]; oversized: number } {
    const lines: string[] = [];
    let oversized = 0;
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl === -1) break;
      const piece = chunk.subarray(start, nl);
      if (this.discarding || this.size + piece.length > this.maxLineBytes) {
        oversized++;
      } else {
        this.parts.push(piece);
        lines.push(Buffer.concat(this.parts).toString('utf8'));
      }
      this.parts = [];
      this.size = 0;
      this.discarding = false;
      start = nl + 1;
    }
    if (start < chunk.length) {
      const rest = chunk.subarray(start);
      if (this.discarding || this.size + rest.length > this.maxLineBytes) {
        if (!this.discarding) oversized++;
        this.discarding = true;
        this.parts = [];
        this.size = 0;
      } else {
        // Copy: the caller may reuse its buffer.
        this.parts.push(Buffer.from(rest));
        this.size += rest.length;
      }
    }
    return { lines, oversized };
  }
}
