import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    projects: [
      {
        test: {
          name: 'unit',
          include: ['packages/*/src/**/*.test.ts'],
        },
      },
      {
        test: {
          name: 'integration',
          include: ['tests/integration/**/*.test.ts'],
          // Real VMs under TCG: seconds per boot, and the machine has 2 cores. One file at a time.
          fileParallelism: false,
          testTimeout: 180_000,
          hookTimeout: 180_000,
        },
      },
      {
        test: {
          // Boots a VM under TCG with AMD SVM emulated and runs kvm-inner in it with a real /dev/kvm.
          // Asked for by `npm run test:kvm` (AEGIS_KVM_SUITE=1): not yet part of `npm test`, see docs/platforms.md.
          name: 'kvm',
          include: process.env['AEGIS_KVM_SUITE'] === '1' ? ['tests/kvm/nested.test.ts'] : [],
          testTimeout: 30 * 60_000,
        },
      },
      {
        test: {
          // The KVM smoke suite itself: only where it is asked for (inside that VM, or on a host with KVM).
          name: 'kvm-inner',
          include: process.env['AEGIS_KVM_INNER'] === '1' ? ['tests/kvm/smoke.test.ts'] : [],
          fileParallelism: false,
          testTimeout: 600_000,
          hookTimeout: 600_000,
        },
      },
      {
        test: {
          name: 'stress',
          include: ['tests/stress/**/*.test.ts'],
          // Real daemons and VMs measured under load: one file at a time, figures printed as a table.
          fileParallelism: false,
          testTimeout: 600_000,
          hookTimeout: 180_000,
        },
      },
    ],
  },
});
