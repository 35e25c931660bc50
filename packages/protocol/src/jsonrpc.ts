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

/** Envelope limits: ids and method names are short in this contract; error text is bounded. */
const MAX_ID_CHARS = 128;
const MAX_METHOD_CHARS = 128;
const MAX_ERROR_MESSAGE_CHARS = 64 * 1024;

function invalid(message: string): AegisError {
  return new AegisError('INVALID_ARGUMENT', message);
}

function onlyMembers(m: Record<string, unknown>, allowed: readonly string[], what: string): void {
  for (const k of Object.keys(m)) {
    // The name is the peer's: quoted and cut short.
    if (!allowed.includes(k)) throw invalid(`${what}: unknown member ${JSON.stringify(k.slice(0, 64))}`);
  }
}

function isId(id: unknown): id is RpcId {
  return (typeof id === 'number' && Number.isSafeInteger(id)) || (typeof id === 'string' && id.length <= MAX_ID_CHARS);
}

/**
 * Classifies one decoded JSON value. Anything that is not a well-formed envelope throws
 * INVALID_ARGUMENT: the peer is untrusted and its bytes are checked before use. Strict: a member
 * JSON-RPC 2.0 does not define for that kind of message is refused, as are ids that are not
 * integers or short strings, long method names, params that are not structured, and an error
 * object other than `{code, message, data?}` (data: `{code, message}`, our WireError).
 */
export function parseMessage(value: unknown): RpcMessage {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw invalid('JSON-RPC message must be an object');
  const m = value as Record<string, unknown>;
  if (m['jsonrpc'] !== '2.0') throw invalid('jsonrpc must be "2.0"');
  const id = m['id'];
  if ('method' in m) {
    const method = m['method'];
    if (typeof method !== 'string' || method.length === 0 || method.length > MAX_METHOD_CHARS) {
      throw invalid(`method must be a string of 1 to ${MAX_METHOD_CHARS} characters`);
    }
    const params = m['params'];
    if ('params' in m && (typeof params !== 'object' || params === null)) throw invalid('params must be an object or an array');
    if (!('id' in m)) {
      onlyMembers(m, ['jsonrpc', 'method', 'params'], 'notification');
      return m as unknown as RpcNotification;
    }
    if (!isId(id)) throw invalid(`request id must be an integer or a string of at most ${MAX_ID_CHARS} characters`);
    onlyMembers(m, ['jsonrpc', 'id', 'method', 'params'], 'request');
    return m as unknown as RpcRequest;
  }
  if ('result' in m && !('error' in m)) {
    if (!isId(id)) throw invalid(`response id must be an integer or a string of at most ${MAX_ID_CHARS} characters`);
    onlyMembers(m, ['jsonrpc', 'id', 'result'], 'response');
    return m as unknown as RpcSuccess;
  }
  if ('error' in m && !('result' in m)) {
    if (id !== null && !isId(id)) throw invalid(`response id must be null, an integer or a string of at most ${MAX_ID_CHARS} characters`);
    onlyMembers(m, ['jsonrpc', 'id', 'error'], 'error response');
    return { jsonrpc: '2.0', id, error: parseErrorObject(m['error']) };
  }
  throw invalid('not a JSON-RPC 2.0 request, notification or response');
}

function parseErrorObject(e: unknown): RpcFailure['error'] {
  if (typeof e !== 'object' || e === null || Array.isArray(e)) throw invalid('error must be an object');
  const o = e as Record<string, unknown>;
  onlyMembers(o, ['code', 'message', 'data'], 'error');
  const { code, message, data } = o;
  if (typeof code !== 'number' || !Number.isSafeInteger(code)) throw invalid('error.code must be an integer');
  if (typeof message !== 'string') throw invalid('error.message must be a string');
  if (data === undefined) return { code, message: cut(message) };
  if (typeof data !== 'object' || data === null || Array.isArray(data)) throw invalid('error.data must be an object');
  const d = data as Record<string, unknown>;
  onlyMembers(d, ['code', 'message'], 'error.data');
  if (typeof d['code'] !== 'string' || d['code'].length > 64) throw invalid('error.data.code must be a short string');
  const dm = d['message'];
  if (typeof dm !== 'string') throw invalid('error.data.message must be a string');
  // An unknown code string is kept: errorFromFailure turns it into UNKNOWN.
  return { code, message: cut(message), data: { code: d['code'] as WireError['code'], message: cut(dm) } };
}

/**
 * Error text is for people: a long one is cut, not refused (refusing the answer would leave its
 * request waiting, and a real harness may quote a long command line in "command not found").
 */
function cut(message: string): string {
  return message.length <= MAX_ERROR_MESSAGE_CHARS ? message : `${message.slice(0, MAX_ERROR_MESSAGE_CHARS)}… (cut)`;
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
      if (this.discarding) {
        // Counted when it overflowed: this is only its end.
      } else if (this.size + piece.length > this.maxLineBytes) {
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
