export {
  Sandbox,
  Commands,
  Files,
  Egress,
  type SandboxOptions,
  type CommandOptions,
  type CommandResult,
  type CommandHandle,
  type FileInfo,
  type EgressInfo,
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
  CommandExitError,
  type ErrorCode,
} from './errors.js';
