/**
 * The one registry of error codes. A code statically and permanently identifies a class of
 * failure; messages may change, codes may not. The same string travels unchanged from the
 * harness (JSON-RPC `error.data.code`) through the daemon (HTTP `{code, message}`) to the CLI.
 */
export const ERROR_CODES = {
  INVALID_ARGUMENT: { httpStatus: 400, rpcCode: -32602 },
  NOT_FOUND: { httpStatus: 404, rpcCode: -32001 },
  ALREADY_EXISTS: { httpStatus: 409, rpcCode: -32002 },
  FAILED_PRECONDITION: { httpStatus: 409, rpcCode: -32003 },
  UNSUPPORTED: { httpStatus: 501, rpcCode: -32004 },
  TIMEOUT: { httpStatus: 504, rpcCode: -32005 },
  UNAVAILABLE: { httpStatus: 503, rpcCode: -32006 },
  RESOURCE_EXHAUSTED: { httpStatus: 429, rpcCode: -32007 },
  CANCELLED: { httpStatus: 499, rpcCode: -32008 },
  /** No credentials, or wrong ones (the E2B endpoint's API key and access tokens). */
  UNAUTHENTICATED: { httpStatus: 401, rpcCode: -32009 },
  /** Credentials were fine, the request is refused anyway (a foreign Origin or Host: DNS rebinding). */
  PERMISSION_DENIED: { httpStatus: 403, rpcCode: -32010 },
  INTERNAL: { httpStatus: 500, rpcCode: -32603 },
  /** Anything a peer sent that is not in this table. Never produced on purpose. */
  UNKNOWN: { httpStatus: 500, rpcCode: -32000 },
} as const satisfies Record<string, { httpStatus: number; rpcCode: number }>;

export type ErrorCode = keyof typeof ERROR_CODES;

export function isErrorCode(value: unknown): value is ErrorCode {
  return typeof value === 'string' && Object.hasOwn(ERROR_CODES, value);
}

/** The wire shape of an error on HTTP, and inside JSON-RPC `error.data`. */
export interface WireError {
  code: ErrorCode;
  message: string;
}

export class AegisError extends Error {
  override readonly name = 'AegisError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }

  toWire(): WireError {
    return { code: this.code, message: this.message };
  }

  get httpStatus(): number {
    return ERROR_CODES[this.code].httpStatus;
  }

  /** Reads an error a peer sent; an unknown or missing code becomes UNKNOWN rather than a crash. */
  static fromWire(value: unknown, fallbackMessage = 'unknown error'): AegisError {
    if (typeof value === 'object' && value !== null) {
      const v = value as Record<string, unknown>;
      const message = typeof v['message'] === 'string' ? v['message'] : fallbackMessage;
      return new AegisError(isErrorCode(v['code']) ? v['code'] : 'UNKNOWN', message);
    }
    return new AegisError('UNKNOWN', fallbackMessage);
  }

  /**
   * Wraps anything thrown into an AegisError, keeping codes already present. An aborted
   * operation (AbortError, or TimeoutError from `AbortSignal.timeout()`) is CANCELLED or
   * TIMEOUT whatever `code` says: `code` describes what failed, an abort is no failure of it.
   */
  static from(err: unknown, code: ErrorCode = 'INTERNAL'): AegisError {
    if (err instanceof AegisError) return err;
    const message = err instanceof Error ? err.message : String(err);
    return new AegisError(abortCode(err) ?? code, message, { cause: err });
  }
}

/**
 * By name, not class: DOMException (signal.throwIfAborted(), fetch) and Node's own AbortError
 * (streams, timers/promises, child_process) are unrelated classes that agree on the name.
 */
function abortCode(err: unknown): ErrorCode | undefined {
  const name = nameOf(err);
  if (name === 'TimeoutError') return 'TIMEOUT';
  if (name !== 'AbortError') return undefined;
  // Node's AbortError carries the signal's reason as its cause: an AbortSignal.timeout() that
  // fired is a timeout even when the API aborted it reports a generic abort.
  return nameOf((err as { cause?: unknown }).cause) === 'TimeoutError' ? 'TIMEOUT' : 'CANCELLED';
}

function nameOf(err: unknown): unknown {
  return typeof err === 'object' && err !== null ? (err as { name?: unknown }).name : undefined;
}

export function isAegisError(err: unknown, code?: ErrorCode): err is AegisError {
  return err instanceof AegisError && (code === undefined || err.code === code);
}
