export { AegisClient, defaultSocketPath, type EventsOptions } from './client.js';
export type * from '@aegis/protocol/api';
export { AegisError, isAegisError, type ErrorCode } from '@aegis/protocol';
