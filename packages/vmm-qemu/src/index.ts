export { QemuBackend } from './backend.js';
export { AGENT_PORT_NAME } from './args.js';
export { QmpClient, type QmpEvent } from './qmp.js';
