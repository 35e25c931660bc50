export type * from './vmm.js';
export { selectBackend, type BackendChoice } from './select.js';
export { fileTail, processAlive } from './host.js';
