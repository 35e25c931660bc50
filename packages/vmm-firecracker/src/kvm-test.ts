/**
 * The KVM test boot: does this host's KVM run our guest kernel under Firecracker? A `/dev/kvm`
 * that opens (and even answers KVM_CREATE_VM) proves nothing: a `kvm-pvm` host, or nested
 * virtualisation without VT-x, fails only once a vCPU runs. So the guest kernel is booted once,
 * with no disk and an init that does not exist: reaching the root mount or init, or the panic
 * that follows, shows that guest code ran under KVM. The verdict is cached by the caller.
 *
 * Firecracker v1.x runs it without an API socket (`--no-api --config-file`); its stdout carries
 * the guest's serial console and its own log lines (`<time> [<id>:<thread>:<LEVEL>] message`
 * with `--show-level`); stderr gets one `Error: ...` line when it fails.
 */
import { spawn as nodeSpawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { AccelVerdict } from '@aegis/vmm';
import type { SpawnVmm } from './backend.js';

export const KVM_TEST_ID = 'aegis-kvm-probe';

// panic=-1 and reboot=k: the panic at the missing init resets the guest, and the reset ends
// Firecracker, so a healthy test ends on its own. No root= and no drive: nothing to prepare.
const KVM_TEST_BOOT_ARGS = 'console=ttyS0 reboot=k panic=-1 pci=off init=/aegis-kvm-probe-no-such-init';

/** The guest kernel has run far enough to look for its root filesystem or init. */
const SIGN_OF_LIFE = /Kernel panic|Run \/|VFS:/;

/**
 * Firecracker's own words that mean KVM refused to run the vCPU (the vCPU thread's errors, an
 * exit KVM could not handle). Any ERROR line naming KVM or a vCPU counts too.
 */
const KVM_FAILURE = /KVM_EXIT_(SHUTDOWN|FAIL_ENTRY|INTERNAL_ERROR)|Failure during vcpu run|KVM failed|Unexpected exit reason/i;

/** The configuration file Firecracker boots from (its `VmmConfig`). */
export function kvmTestConfig(kernelPath: string): unknown {
  return {
    'boot-source': { kernel_image_path: path.resolve(kernelPath), boot_args: KVM_TEST_BOOT_ARGS },
    // Firecracker's config-file parser requires the list, even empty.
    drives: [],
    'machine-config': { vcpu_count: 1, mem_size_mib: 128 },
  };
}

export interface KvmTestOptions {
  binary: string;
  kernelPath: string;
  /** The guest must reach its root mount within this. */
  timeoutMs: number;
  spawn?: SpawnVmm;
}

/**
 * Boots the guest kernel once under Firecracker and says whether it ran. Throws only when the
 * test itself could not be set up (no temp dir, binary not executable): that says nothing about
 * KVM and must not be cached as a verdict.
 */
export async function testBoot(options: KvmTestOptions): Promise<AccelVerdict> {
  const t0 = performance.now();
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-kvm-probe-'));
  try {
    const configFile = path.join(dir, 'vm.json');
    await fs.writeFile(configFile, `${JSON.stringify(kvmTestConfig(options.kernelPath))}\n`);
    const child = (options.spawn ?? nodeSpawn)(
      options.binary,
      ['--no-api', '--config-file', configFile, '--id', KVM_TEST_ID, '--show-level'],
      // stdin /dev/null: Firecracker only warns that it cannot read serial input from it.
      { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    const closed = new Promise<void>((resolve) => {
      child.once('close', () => resolve());
      child.once('error', () => resolve());
    });
    try {
      const outcome = await watch(child, options.binary, options.timeoutMs);
      return { ...outcome, costMs: Math.round(performance.now() - t0), testedAt: new Date().toISOString() };
    } finally {
      child.kill('SIGKILL');
      // Bounded: a process stuck in the kernel must not hold the probe (it is killed anyway).
      await Promise.race([closed, sleep(2000)]);
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms).unref());
}

async function watch(child: ChildProcess, binary: string, timeoutMs: number): Promise<{ usable: boolean; detail: string }> {
  const out = new BootOutput();
  let timer: NodeJS.Timeout | undefined;
  try {
    return await new Promise((resolve, reject) => {
      timer = setTimeout(() => resolve({ usable: false, detail: out.timeoutDetail(timeoutMs) }), timeoutMs);
      const onData = (stream: 'stdout' | 'stderr') => (chunk: Buffer) => {
        const v = out.feed(stream, chunk.toString('utf8'));
        if (v) resolve(v);
      };
      child.stdout?.on('data', onData('stdout'));
      child.stderr?.on('data', onData('stderr'));
      child.once('error', (err) => reject(new AegisError('UNAVAILABLE', `cannot run ${binary} for the KVM test: ${err.message}`)));
      // 'close', not 'exit': every byte it wrote has been read by then.
      child.once('close', (code: number | null, sig: NodeJS.Signals | null) => resolve(out.end() ?? out.exitDetail(code, sig)));
    });
  } finally {
    clearTimeout(timer);
  }
}

interface FirecrackerLogLine {
  level: string | undefined;
  message: string;
}

const LEVELS = new Set(['ERROR', 'WARN', 'INFO', 'DEBUG', 'TRACE']);

/** `<time> [aegis-kvm-probe:<thread>[:<LEVEL>]] <message>`, or undefined for a console line. */
export function firecrackerLogLine(line: string): FirecrackerLogLine | undefined {
  const m = new RegExp(`\\[${KVM_TEST_ID}:([^\\]]*)\\]\\s?(.*)$`).exec(line);
  if (!m) return undefined;
  const level = m[1]?.split(':').pop();
  return { level: level && LEVELS.has(level) ? level : undefined, message: m[2] ?? '' };
}

/**
 * Reads Firecracker's two streams line by line and decides as soon as a line settles it: a
 * console line showing the guest reached its root mount (usable), or a Firecracker line showing
 * KVM failed the vCPU (not usable).
 */
export class BootOutput {
  private readonly partial = { stdout: '', stderr: '' };
  private consoleLines = 0;
  private lastConsole = '';
  private lastError = '';
  private lastLog = '';
  private lastStderr = '';

  feed(stream: 'stdout' | 'stderr', text: string): { usable: boolean; detail: string } | undefined {
    const lines = (this.partial[stream] + text).split('\n');
    this.partial[stream] = lines.pop() ?? '';
    for (const line of lines) {
      const v = this.line(stream, line);
      if (v) return v;
    }
    return undefined;
  }

  /** The streams have ended: their unterminated last lines count too. */
  end(): { usable: boolean; detail: string } | undefined {
    for (const stream of ['stdout', 'stderr'] as const) {
      const rest = this.partial[stream];
      this.partial[stream] = '';
      const v = rest ? this.line(stream, rest) : undefined;
      if (v) return v;
    }
    return undefined;
  }

  private line(stream: 'stdout' | 'stderr', raw: string): { usable: boolean; detail: string } | undefined {
    const line = raw.replace(/\r$/, '').trim();
    if (!line) return undefined;
    if (stream === 'stderr') {
      this.lastStderr = line;
      return undefined;
    }
    const log = firecrackerLogLine(line);
    if (!log) {
      this.consoleLines++;
      this.lastConsole = line;
      if (SIGN_OF_LIFE.test(line)) return { usable: true, detail: `the guest kernel ran under KVM: ${line}` };
      return undefined;
    }
    // Its exit line only repeats the status, which the exit itself reports.
    if (/^Firecracker exiting/.test(log.message)) return undefined;
    this.lastLog = log.message;
    if (log.level === 'ERROR') this.lastError = log.message;
    if (KVM_FAILURE.test(log.message) || (log.level === 'ERROR' && /\bkvm\b|vcpu/i.test(log.message))) {
      return { usable: false, detail: `Firecracker: ${log.message}` };
    }
    return undefined;
  }

  /** Firecracker ended before the guest kernel got anywhere: its last words say why. */
  exitDetail(code: number | null, sig: NodeJS.Signals | null): { usable: boolean; detail: string } {
    const how = sig ? `was killed by ${sig}` : `exited with status ${code ?? '?'}`;
    const words = this.lastError || this.lastStderr || this.lastLog;
    return { usable: false, detail: `Firecracker ${how} before the guest kernel reached its root mount${words ? `: ${words}` : ''}` };
  }

  timeoutDetail(timeoutMs: number): string {
    if (this.consoleLines === 0) return `no sign of life within ${timeoutMs} ms${this.lastLog ? ` (Firecracker: ${this.lastLog})` : ''}`;
    return `the guest kernel did not reach its root mount within ${timeoutMs} ms (last console line: ${this.lastConsole})`;
  }
}
