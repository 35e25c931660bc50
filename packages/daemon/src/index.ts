export { startDaemon, knownBackends, VERSION, type DaemonContext } from './daemon.js';
export { loadConfig, aegisHome, type DaemonConfig } from './config.js';
export { stderrLogger, type Logger } from './log.js';
export { Registry } from './registry/db.js';
export { INSTANCE_STATES, canTransition, type InstanceState } from './instances/state.js';
