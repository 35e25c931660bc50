#!/usr/bin/env node
// npm run bench: Aegis against the reference measured in the same run, median of N runs each.
//   cold `aegis run -- true` (CLI -> aegisd -> new VM -> harness -> workload -> VM gone)
//   vs. the raw boot of the same kernel + rootfs by QEMU alone (init=/bin/true; QEMU exits
//   when the kernel panics on init's exit), started through the same backend code.
// Target (issue 2): ratio <= 1.2.
import { execFile, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, realpathSync, existsSync, mkdirSync, writeFileSync, openSync, closeSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AegisClient } from '@aegis/client';
import { QemuBackend } from '@aegis/vmm-qemu';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const RUNS = Number(process.env.BENCH_RUNS ?? 5);
const mainHome = process.env.AEGIS_HOME ?? path.join(os.homedir(), '.aegis');
const kernel = path.join(mainHome, 'cache/kernel/vmlinux');
const rootfs = path.join(mainHome, 'cache/rootfs/base.erofs');
for (const f of [kernel, rootfs]) if (!existsSync(f)) throw new Error(`${f} missing: run make all`);

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const fmt = (ms) => `${(ms / 1000).toFixed(3)} s`;

async function rawBoot(workDir, i) {
  const stateDir = path.join(workDir, `raw-${i}`);
  mkdirSync(stateDir, { recursive: true });
  const scratch = path.join(stateDir, 'scratch.img');
  writeFileSync(scratch, '');
  const backend = new QemuBackend();
  const vm = await backend.create({
    id: `bench-raw-${i}`,
    stateDir,
    kernelPath: realpathSync(kernel),
    rootfsPath: realpathSync(rootfs),
    scratchDiskPath: scratch,
    memoryMiB: 512,
    vcpuCount: 1,
    kernelArgs: ['init=/bin/true'],
  });
  const t0 = performance.now();
  await vm.start();
  const exit = await vm.exited;
  const ms = performance.now() - t0;
  if (exit.reason !== 'guest-poweroff' && exit.reason !== 'guest-panic') throw new Error(`raw boot ended oddly: ${exit.detail}`);
  return ms;
}

function aegisRun(env) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile(path.join(ROOT, 'bin/aegis'), ['run', '--', 'true'], { env }, (err) => {
      if (err) reject(err);
      else resolve(performance.now() - t0);
    });
  });
}

const home = mkdtempSync('/tmp/aegis-bench-');
const env = { ...process.env, AEGIS_HOME: home, AEGIS_KERNEL: realpathSync(kernel), AEGIS_ROOTFS: realpathSync(rootfs) };
const log = openSync(path.join(home, 'aegisd.log'), 'a');
const daemon = spawn(process.execPath, [path.join(ROOT, 'packages/daemon/dist/main.js')], { env, stdio: ['ignore', log, log] });
closeSync(log);
try {
  const client = new AegisClient(path.join(home, 'aegisd.sock'));
  for (let i = 0; ; i++) {
    try {
      await client.status();
      break;
    } catch (err) {
      if (i > 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  const status = await client.status();
  console.log(`aegis bench: ${RUNS} runs each, backend ${status.backend.name} (${status.backend.detail})`);
  console.log(`host: ${os.cpus().length} x ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version}\n`);

  // Interleave the two so drift in machine load hits both alike; one warm-up of each first.
  await rawBoot(home, 'warm');
  await aegisRun(env);
  const raw = [];
  const ours = [];
  for (let i = 0; i < RUNS; i++) {
    raw.push(await rawBoot(home, i));
    ours.push(await aegisRun(env));
  }
  const rows = [
    ['raw QEMU boot (same kernel + rootfs, init=/bin/true)', raw],
    ['cold `aegis run -- true`', ours],
  ];
  for (const [name, xs] of rows) {
    console.log(`${name.padEnd(56)} median ${fmt(median(xs))}  (min ${fmt(Math.min(...xs))}, max ${fmt(Math.max(...xs))})`);
  }
  const ratio = median(ours) / median(raw);
  console.log(`\nratio aegis run / raw boot: ${ratio.toFixed(2)}x   (target <= 1.20x: ${ratio <= 1.2 ? 'met' : 'NOT met'})`);
  const out = path.join(ROOT, 'bench/results');
  mkdirSync(out, { recursive: true });
  writeFileSync(
    path.join(out, `core-${new Date().toISOString().replaceAll(':', '-')}.json`),
    JSON.stringify({ runs: RUNS, rawBootMs: raw, aegisRunTrueMs: ours, ratio, backend: status.backend }, null, 2),
  );
} finally {
  daemon.kill('SIGTERM');
  await new Promise((r) => daemon.once('exit', r));
  rmSync(home, { recursive: true, force: true });
}
