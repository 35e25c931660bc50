export { AegisClient, defaultSocketPath } from './client.js';
export type * from './types.js';
export { AegisError, isAegisError, type ErrorCode } from '@aegis/protocol';
