/**
 * Errors the SDK throws: one class per kind, each carrying the daemon's stable `code`
 * unchanged, so a caller can `catch (e) { if (e instanceof NotFoundError) … }` or switch on
 * `e.code`. Messages may change; codes do not.
 */
import { AegisError, type ErrorCode } from '@aegis/protocol';

// The registry's codes (protocol/errors.ts). build.mjs writes the union out in the shipped
// declarations, which cannot import a package the tarball does not have.
export type { ErrorCode };

export class SandboxError extends Error {
  override name = 'SandboxError';
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

export class InvalidArgumentError extends SandboxError {
  override name = 'InvalidArgumentError';
}
export class NotFoundError extends SandboxError {
  override name = 'NotFoundError';
}
export class AlreadyExistsError extends SandboxError {
  override name = 'AlreadyExistsError';
}
export class FailedPreconditionError extends SandboxError {
  override name = 'FailedPreconditionError';
}
/** The daemon is not running or not reachable, or the sandbox's VM went away. */
export class UnavailableError extends SandboxError {
  override name = 'UnavailableError';
}
export class TimeoutError extends SandboxError {
  override name = 'TimeoutError';
}
/** The call's AbortSignal fired. */
export class CancelledError extends SandboxError {
  override name = 'CancelledError';
}

/**
 * A command that exited non-zero, thrown only when asked (`throwOnError: true`), as E2B's
 * `commands.run` throws it. Not a SandboxError: the sandbox did what it was asked, the command
 * failed, and its result is here whole.
 */
export class CommandExitError extends Error {
  override name = 'CommandExitError';
  constructor(readonly result: { exitCode: number; signal: string | null; stdout: string; stderr: string }) {
    super(`the command exited with ${result.exitCode}${result.stderr ? `: ${lastLine(result.stderr)}` : ''}`);
  }
  get exitCode(): number {
    return this.result.exitCode;
  }
  get signal(): string | null {
    return this.result.signal;
  }
  get stdout(): string {
    return this.result.stdout;
  }
  get stderr(): string {
    return this.result.stderr;
  }
}

function lastLine(text: string): string {
  const line = text.trimEnd().split('\n').pop() ?? '';
  return line.length > 200 ? `${line.slice(0, 197)}...` : line;
}

const CLASSES: Partial<Record<ErrorCode, typeof SandboxError>> = {
  INVALID_ARGUMENT: InvalidArgumentError,
  NOT_FOUND: NotFoundError,
  ALREADY_EXISTS: AlreadyExistsError,
  FAILED_PRECONDITION: FailedPreconditionError,
  UNAVAILABLE: UnavailableError,
  TIMEOUT: TimeoutError,
  CANCELLED: CancelledError,
};

/** Any error from below as the SDK's class for its code. */
export function toSandboxError(err: unknown): SandboxError {
  if (err instanceof SandboxError) return err;
  const e = AegisError.from(err);
  const Class = CLASSES[e.code] ?? SandboxError;
  return new Class(e.code, e.message, { cause: err });
}

/** Runs `fn`, rethrowing whatever it throws as a SandboxError. */
export async function wrap<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toSandboxError(err);
  }
}
