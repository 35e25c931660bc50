/**
 * Runs the KVM smoke suite (smoke.test.ts) with a real /dev/kvm on a machine that has none: in
 * a Linux booted under TCG with AMD SVM emulated (outer-vm.ts; the recipe and its figures are in
 * ../../docs/platforms.md). Prints plainly what ran under KVM and how long it took.
 */
import { mkdtempSync, readFileSync, existsSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT } from '../integration/fixture.js';
import { outerArtifacts, runInOuterVm } from './outer-vm.js';

interface JsonReport {
  numPassedTests: number;
  numFailedTests: number;
  numPendingTests: number;
  testResults: { assertionResults: { fullName: string; status: string; duration?: number; failureMessages: string[] }[] }[];
}

const x64 = os.arch() === 'x64';
const cache = path.join(os.homedir(), '.aegis/cache/nested');
const SUITE_TIMEOUT_MS = 25 * 60_000;

describe('the KVM path, under nested KVM', () => {
  it.skipIf(!x64)(
    'the KVM smoke suite passes with a real /dev/kvm (in a VM booted under TCG, with SVM emulated)',
    { timeout: SUITE_TIMEOUT_MS + 120_000 },
    async () => {
      const artifacts = outerArtifacts(cache);
      const results = mkdtempSync('/tmp/aegis-kvm-');
      let passed = false;
      let pending = '';
      let started = false;
      try {
        const env = {
          HOME: os.homedir(),
          PATH: process.env['PATH'] ?? '/usr/bin:/bin',
          CI: process.env['CI'] ?? '',
          AEGIS_KVM_INNER: '1',
          // aegisd takes 9–20 s to answer in L1 (node runs under TCG there).
          AEGIS_TEST_DAEMON_START_MS: '180000',
        };
        const exports = Object.entries(env)
          .map(([k, v]) => `export ${k}=${JSON.stringify(v)}`)
          .join('\n');
        const vitest = path.join(ROOT, 'node_modules/vitest/vitest.mjs');
        // AEGIS_KVM_FILTER=<pattern>: only the smoke cases whose names match (vitest -t), when looking into one.
        const only = process.env['AEGIS_KVM_FILTER'];
        const filter = only ? ` -t ${JSON.stringify(only)}` : '';
        const script = [
          exports,
          `cd ${JSON.stringify(ROOT)}`,
          `echo "aegis-l1: running the KVM smoke suite"`,
          // Through a pipe: vitest's console is L1's serial terminal, where it would redraw lines.
          `(node ${vitest} run --project kvm-inner --reporter=verbose --reporter=json --outputFile.json=${results}/smoke.json${filter}; echo $? > ${results}/exit) 2>&1 | cat`,
        ].join('\n');
        const run = await runInOuterVm(artifacts, results, script, {
          timeoutMs: SUITE_TIMEOUT_MS,
          onConsole: (s) => {
            // What L1's script prints from its start, whole lines; not the kernel's messages.
            pending += s;
            const lines = pending.split('\n');
            pending = lines.pop() ?? '';
            for (const line of lines) {
              if (line.includes('aegis-l1: up')) started = true;
              if (started && line.trim() && !/^\[\s*\d+\.\d+\]/.test(line)) console.log(`[L1] ${line.trimEnd()}`);
            }
          },
        });
        const reportFile = path.join(results, 'smoke.json');
        const report = existsSync(reportFile) ? (JSON.parse(readFileSync(reportFile, 'utf8')) as JsonReport) : undefined;
        const cases = report?.testResults.flatMap((f) => f.assertionResults) ?? [];
        console.log(
          [
            `KVM smoke suite: ran under KVM (nested: ${artifacts.kernelPackage} under QEMU TCG with SVM), ` +
              `${Math.round(run.durationMs / 1000)} s in all`,
            ...cases.map((c) => `  ${c.status.padEnd(7)} ${((c.duration ?? 0) / 1000).toFixed(1).padStart(6)} s  ${c.fullName}`),
          ].join('\n'),
        );
        const failures = cases
          // A skip is a failure too (a failed beforeAll skips every case), unless a filter asked for it.
          .filter((c) => c.status !== 'passed' && !(only && c.status === 'skipped'))
          .map((c) => `${c.fullName}: ${c.status}\n${c.failureMessages.join('\n')}`);
        expect(report, `no report from L1; its console ends:\n${run.console.slice(-4000)}`).toBeDefined();
        expect(failures, failures.join('\n\n')).toEqual([]);
        expect(cases.filter((c) => c.status === 'passed').length).toBeGreaterThanOrEqual(only ? 1 : 5);
        expect(run.exitCode).toBe(0);
        passed = true;
      } finally {
        if (passed) rmSync(results, { recursive: true, force: true });
        else console.log(`L1's console and the inner report are kept in ${results}`);
      }
    },
  );
});
