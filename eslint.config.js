// Lint rules, and the import arrows between packages (see each package's README).
import js from '@eslint/js';
import tseslint from 'typescript-eslint';

const layer = (files, forbidden) => ({
  files,
  rules: {
    'no-restricted-imports': [
      'error',
      { patterns: forbidden.map((p) => ({ group: [p], message: `this package may not import ${p} (see its README)` })) },
    ],
  },
});

export default tseslint.config(
  {
    ignores: [
      '**/dist/**',
      'node_modules/**',
      'bench/results/**',
      'bench/.build/**',
      'packages/sdk/docs/**',
      'packages/protocol/src/generated/**',
      'packages/daemon/src/e2b/gen/**',
      'tests/support/*.bundle.mjs',
    ],
  },
  js.configs.recommended,
  ...tseslint.configs.recommended,
  {
    languageOptions: {
      globals: {
        process: 'readonly',
        console: 'readonly',
        Buffer: 'readonly',
        URL: 'readonly',
        setTimeout: 'readonly',
        clearTimeout: 'readonly',
        setInterval: 'readonly',
        clearInterval: 'readonly',
        setImmediate: 'readonly',
        queueMicrotask: 'readonly',
        performance: 'readonly',
      },
    },
    rules: {
      '@typescript-eslint/no-unused-vars': ['error', { argsIgnorePattern: '^_' }],
    },
  },
  layer(['packages/protocol/**'], ['@aegis/*', 'node:fs*', 'node:net', 'node:child_process']),
  layer(['packages/archive/**'], ['@aegis/vmm*', '@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  layer(['packages/vmm/**'], ['@aegis/vmm-*', '@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  layer(['packages/vmm-qemu/**'], ['@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  layer(['packages/vmm-firecracker/**'], ['@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  // The one place that names every backend: the daemon and the CLI take them from here.
  layer(['packages/backends/**'], ['@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  layer(['packages/harness/**'], ['@aegis/vmm*', '@aegis/daemon', '@aegis/client', '@aegis/cli']),
  layer(['packages/daemon/**'], ['@aegis/vmm-*', '@aegis/harness', '@aegis/client', '@aegis/cli']),
  layer(['packages/client/**'], ['@aegis/vmm*', '@aegis/daemon', '@aegis/harness', '@aegis/cli']),
  layer(['packages/sdk/**'], ['@aegis/vmm*', '@aegis/daemon', '@aegis/harness', '@aegis/cli', '@aegis/archive']),
  // The browser bundle: @aegis/protocol's API types only (import type), never Node or aegisd code.
  layer(
    ['packages/ui/src/**'],
    ['@aegis/vmm*', '@aegis/daemon', '@aegis/harness', '@aegis/client', '@aegis/cli', '@aegis/backends', '@aegis/archive', 'node:*'],
  ),
  layer(['packages/cli/**'], ['@aegis/vmm-*', '@aegis/daemon', '@aegis/harness', '@aegis/daemon/*']),
);
