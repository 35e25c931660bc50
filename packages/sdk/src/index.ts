export {
  Sandbox,
  Commands,
  Files,
  type SandboxOptions,
  type CommandOptions,
  type CommandResult,
  type CommandHandle,
  type FileInfo,
} from './sandbox.js';
export {
  SandboxError,
  InvalidArgumentError,
  NotFoundError,
  AlreadyExistsError,
  FailedPreconditionError,
  UnavailableError,
  TimeoutError,
  CancelledError,
  type ErrorCode,
} from './errors.js';
