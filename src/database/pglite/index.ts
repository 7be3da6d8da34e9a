export * from './pglite-pg-driver.js';
export * from './pglite-database.js';
