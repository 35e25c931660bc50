export * from './errors.js';
export * from './jsonrpc.js';
export * from './guest.js';
export * from './rpc-peer.js';
export * from './data-frames.js';
export * from './files.js';
export * from './durations.js';
