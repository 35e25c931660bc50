export { FirecrackerBackend, type FirecrackerOptions, type SpawnVmm } from './backend.js';
export { AGENT_VSOCK_PORT, DATA_VSOCK_PORT } from './config.js';
export { FirecrackerApi, type ApiCallOptions, type ApiMethod } from './api.js';
export { connectVsock, type VsockConnectOptions } from './vsock.js';
