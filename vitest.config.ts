import { defineConfig } from 'vitest/config';

// Three projects so a developer can run one layer at a time; `npm test` runs all three.
// Integration and e2e suites talk to the real PostgreSQL and Redis on this machine
// (see .ci/run); each test file creates its own database, so files may run in parallel.
export default defineConfig({
  test: {
    globalSetup: ['test/global-setup.ts'],
    projects: [
      {
        extends: true,
        test: { name: 'unit', include: ['src/**/*.spec.ts', 'libs/**/*.spec.ts', 'bench/**/*.spec.ts'] },
      },
      {
        extends: true,
        test: { name: 'integration', include: ['test/integration/**/*.int-spec.ts'], testTimeout: 60_000, hookTimeout: 120_000 },
      },
      {
        extends: true,
        test: { name: 'e2e', include: ['test/e2e/**/*.e2e-spec.ts'], testTimeout: 60_000, hookTimeout: 120_000 },
      },
    ],
  },
});
