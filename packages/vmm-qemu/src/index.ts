export { QemuBackend, AGENT_PORT_NAME } from './backend.js';
export { QmpClient, type QmpEvent } from './qmp.js';
