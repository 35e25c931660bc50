/**
 * Test fixture: a real aegisd process with its own AEGIS_HOME, booting real VMs from the
 * kernel and rootfs that `make all` built. Always torn down: instances deleted, daemon
 * stopped, no QEMU left behind; on failure the daemon log is printed.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, realpathSync, rmSync, readdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, onTestFinished } from 'vitest';
import { AegisClient } from '@aegis/client';

export const ROOT = fileURLToPath(new URL('../..', import.meta.url));
const mainHome = process.env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis');

export function artifacts(): { kernel: string; rootfs: string } {
  const kernel = path.join(mainHome, 'cache/kernel/vmlinux');
  const rootfs = path.join(mainHome, 'cache/rootfs/base.erofs');
  for (const f of [kernel, rootfs]) {
    if (!existsSync(f)) throw new Error(`${f} is missing: run \`make all\` before the integration tests`);
  }
  return { kernel: realpathSync(kernel), rootfs: realpathSync(rootfs) };
}

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

export class TestDaemon {
  readonly client: AegisClient;
  private proc: ChildProcess | undefined;
  readonly logFile: string;

  constructor(
    readonly home: string,
    private readonly extraEnv: NodeJS.ProcessEnv = {},
    /** A command the daemon runs under, e.g. one that puts it in its own network namespace. */
    private readonly launcher: string[] = [],
  ) {
    this.client = new AegisClient(path.join(home, 'aegisd.sock'));
    this.logFile = path.join(home, 'aegisd.log');
  }

  get env(): NodeJS.ProcessEnv {
    const a = artifacts();
    // No warm pool unless a test asks for one: every test daemon filling its own would load a
    // 2-core machine with VMs that nothing uses (pool.test.ts runs with it).
    return {
      ...process.env,
      AEGIS_HOME: this.home,
      AEGIS_KERNEL: a.kernel,
      AEGIS_ROOTFS: a.rootfs,
      AEGIS_POOL_SIZE: '0',
      ...this.extraEnv,
    };
  }

  get pid(): number | undefined {
    return this.proc?.pid;
  }

  async start(): Promise<void> {
    const log = openSync(this.logFile, 'a');
    const [cmd = process.execPath, ...args] = [...this.launcher, process.execPath, path.join(ROOT, 'packages/daemon/dist/main.js')];
    this.proc = spawn(cmd, args, { env: this.env, stdio: ['ignore', log, log] });
    closeSync(log);
    // Raised where everything runs slower than here, as inside the nested-KVM VM (tests/kvm/).
    const deadline = Date.now() + Number(process.env['AEGIS_TEST_DAEMON_START_MS'] ?? 20_000);
    for (;;) {
      try {
        await this.client.status();
        return;
      } catch {
        if (this.proc.exitCode !== null || Date.now() > deadline) throw new Error(`aegisd did not start:\n${this.log()}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /** SIGKILL, as a crash would. */
  async kill(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGKILL');
    await gone;
  }

  async stop(): Promise<void> {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once('exit', r));
    p.kill('SIGTERM');
    await gone;
  }

  log(): string {
    try {
      return readFileSync(this.logFile, 'utf8');
    } catch {
      return '(no daemon log)';
    }
  }

  /** Runs the real CLI (bin/aegis) against this daemon. */
  cli(args: string[], options: { input?: string; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<CliResult> {
    return new Promise((resolve) => {
      const child = execFile(
        path.join(ROOT, 'bin/aegis'),
        args,
        { env: { ...this.env, ...options.env }, timeout: options.timeoutMs ?? 120_000, maxBuffer: 64 << 20 },
        (err, stdout, stderr) => {
          const code = err ? (typeof err.code === 'number' ? err.code : 1) : 0;
          resolve({ code, stdout, stderr });
        },
      );
      if (options.input !== undefined) child.stdin?.end(options.input);
      else child.stdin?.end();
    });
  }

  instanceDirs(): string[] {
    try {
      return readdirSync(path.join(this.home, 'instances'));
    } catch {
      return [];
    }
  }
}

/** Polls `check` every 100 ms until it holds; throws naming `what` after `timeoutMs`. */
export async function until(check: () => Promise<boolean> | boolean, timeoutMs: number, what: string): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/**
 * A throwaway `run` returns at its workload's exit and its VM is torn down behind it: waits
 * until this daemon has no VM, no instance and no instance files left.
 */
export async function untilNothingLeft(d: TestDaemon, timeoutMs = 20_000): Promise<void> {
  await until(
    async () =>
      (await qemuProcessesFor(d.home)).length === 0 &&
      d.instanceDirs().length === 0 &&
      (await d.client.listInstances({ all: true })).length === 0,
    timeoutMs,
    'no VM, instance or instance files left',
  );
}

/** VMM processes (QEMU, Firecracker) started for VMs of this daemon's home. */
export async function qemuProcessesFor(home: string): Promise<string[]> {
  const out = await new Promise<string>((resolve) =>
    execFile('ps', ['-eo', 'pid=,args='], { maxBuffer: 16 << 20 }, (_e, stdout) => resolve(stdout)),
  );
  return out.split('\n').filter((l) => (l.includes('qemu-system') || l.includes('firecracker')) && l.includes(home));
}

/** Removes everything a test daemon left: instances, the daemon, stray QEMU, its home. */
export async function teardown(d: TestDaemon, printLog: boolean): Promise<void> {
  try {
    for (const i of await d.client.listInstances({ all: true }).catch(() => [])) {
      await d.client.deleteInstance(i.id, { force: true }).catch(() => undefined);
    }
  } finally {
    await d.stop();
    if (printLog) process.stderr.write(`--- aegisd log (${d.home}) ---\n${d.log()}\n`);
    for (const line of await qemuProcessesFor(d.home)) {
      const pid = Number(line.trim().split(/\s+/)[0]);
      if (pid > 0) process.kill(pid, 'SIGKILL');
    }
    rmSync(d.home, { recursive: true, force: true });
  }
}

/**
 * A daemon of the calling test's own (its own environment), started; torn down when the test
 * finishes, with its log printed if the test failed.
 */
export async function ownDaemon(extraEnv: NodeJS.ProcessEnv = {}): Promise<TestDaemon> {
  const d = new TestDaemon(mkdtempSync('/tmp/aegis-it-'), extraEnv);
  onTestFinished((ctx) => teardown(d, ctx.task.result?.state === 'fail'));
  await d.start();
  return d;
}

/**
 * One daemon for a test file: started before its tests, torn down after them; the daemon's
 * log is printed when any test failed.
 */
export function useDaemon(extraEnv: NodeJS.ProcessEnv = {}, launcher: string[] = []): () => TestDaemon {
  let d: TestDaemon | undefined;
  let anyFailed = false;
  beforeAll(async () => {
    d = new TestDaemon(mkdtempSync('/tmp/aegis-it-'), extraEnv, launcher);
    await d.start();
  });
  afterEach(async (ctx) => {
    if (ctx.task.result?.state === 'fail') anyFailed = true;
    // Each test starts from an empty daemon, whatever the last one left.
    for (const i of (await d?.client.listInstances({ all: true }).catch(() => [])) ?? []) {
      await d?.client.deleteInstance(i.id, { force: true }).catch(() => undefined);
    }
  });
  afterAll(async () => {
    if (d) await teardown(d, anyFailed);
  });
  return () => {
    if (!d) throw new Error('daemon not started');
    return d;
  };
}
