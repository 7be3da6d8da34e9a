export * from './wire.js';
export * from './sse.js';
