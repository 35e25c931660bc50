/**
 * Runs the API fuzzer alone until the root vitest.config.ts has a `stress` project:
 *   npx vitest run --config tests/stress/api-fuzz.vitest.config.ts
 * (The root config's projects include neither tests/stress nor this file, so
 * `npx vitest run tests/stress/api-fuzz.test.ts` finds no test there.)
 */
import { fileURLToPath } from 'node:url';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    root: fileURLToPath(new URL('../..', import.meta.url)),
    include: ['tests/stress/api-fuzz.test.ts'],
    // One real daemon (and at most one VM) on a shared 2-core machine.
    fileParallelism: false,
    hookTimeout: 180_000,
  },
});
