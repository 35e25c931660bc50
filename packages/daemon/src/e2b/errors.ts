/**
 * Errors as E2B's clients expect them. Inside, every failure is an AegisError with a code of
 * the registry (@aegis/protocol); here it becomes what the `e2b` SDK turns into its own classes:
 * on REST, E2B's `{code: <status>, message}` with the status the SDK maps (401 →
 * AuthenticationError, 404 → NotFoundError…); on envd's Connect-RPC, a ConnectError whose code
 * the SDK maps (NotFound → NotFoundError, DeadlineExceeded → TimeoutError, InvalidArgument →
 * InvalidArgumentError, Unauthenticated → AuthenticationError). Our stable code travels beside
 * it, in the `x-aegis-error-code` header (REST) or metadata (Connect).
 */
import { Code, ConnectError } from '@connectrpc/connect';
import { AegisError, type ErrorCode } from '@aegis/protocol';

export const ERROR_CODE_HEADER = 'x-aegis-error-code';

/** Any thrown value as an AegisError (unknown ones are INTERNAL, their message kept). */
export function asAegis(err: unknown): AegisError {
  if (err instanceof AegisError) return err;
  if (err instanceof ConnectError) return new AegisError(codeOfConnect(err.code), err.rawMessage);
  return new AegisError('INTERNAL', err instanceof Error ? err.message : String(err));
}

/** The HTTP status E2B's REST API would answer for this failure. */
export function restStatus(code: ErrorCode): number {
  switch (code) {
    case 'INVALID_ARGUMENT':
      return 400;
    case 'UNAUTHENTICATED':
      return 401;
    case 'PERMISSION_DENIED':
      return 403;
    case 'NOT_FOUND':
      return 404;
    case 'ALREADY_EXISTS':
    case 'FAILED_PRECONDITION':
      return 409;
    case 'RESOURCE_EXHAUSTED':
      return 429;
    case 'UNSUPPORTED':
      return 501;
    case 'UNAVAILABLE':
      return 503;
    case 'TIMEOUT':
      return 504;
    case 'CANCELLED':
      return 499;
    default:
      return 500;
  }
}

/** E2B's REST error body. */
export function restError(err: unknown): { status: number; code: ErrorCode; body: { code: number; message: string } } {
  const e = asAegis(err);
  const status = restStatus(e.code);
  return { status, code: e.code, body: { code: status, message: e.message } };
}

const TO_CONNECT: Partial<Record<ErrorCode, Code>> = {
  INVALID_ARGUMENT: Code.InvalidArgument,
  NOT_FOUND: Code.NotFound,
  ALREADY_EXISTS: Code.AlreadyExists,
  FAILED_PRECONDITION: Code.FailedPrecondition,
  UNSUPPORTED: Code.Unimplemented,
  TIMEOUT: Code.DeadlineExceeded,
  UNAVAILABLE: Code.Unavailable,
  RESOURCE_EXHAUSTED: Code.ResourceExhausted,
  CANCELLED: Code.Canceled,
  UNAUTHENTICATED: Code.Unauthenticated,
  PERMISSION_DENIED: Code.PermissionDenied,
};

function codeOfConnect(code: Code): ErrorCode {
  for (const [k, v] of Object.entries(TO_CONNECT)) if (v === code) return k as ErrorCode;
  return 'UNKNOWN';
}

/** A ConnectError for envd's clients, with our code in its metadata. */
export function connectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  const e = asAegis(err);
  return new ConnectError(e.message, TO_CONNECT[e.code] ?? Code.Internal, { [ERROR_CODE_HEADER]: e.code });
}

/** The HTTP status envd's own HTTP endpoints (`/files`) answer; the SDK maps 400/401/404/507. */
export function envdHttpStatus(code: ErrorCode): number {
  if (code === 'RESOURCE_EXHAUSTED') return 507;
  return restStatus(code);
}
