export * from './tar.js';
