/**
 * Whether Firecracker can be offered here: the architecture, the binary, a KVM device that
 * opens, and a KVM verdict (cached, else a test boot in the background, kvm-test.ts), since
 * Firecracker has no software fallback.
 */
import { execFile } from 'node:child_process';
import { constants as fsc, promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import {
  KVM_DEVICE,
  accelMode,
  hostCpuFingerprint,
  kvmTestTimeoutMs,
  kvmDeviceProblem,
  verdictKey,
  verdictGate,
  type AccelVerdict,
  type Capabilities,
  type Probe,
} from '@aegis/vmm';
import type { FirecrackerOptions } from './backend.js';
import { testBoot } from './kvm-test.js';

const execFileP = promisify(execFile);

export const BINARY = 'firecracker';
const INSTALL_HINT =
  'download a release binary from github.com/firecracker-microvm/firecracker/releases and put it on PATH or set AEGIS_FIRECRACKER';

function capabilities(): Capabilities {
  return {
    pause: true,
    snapshot: true,
    survivesDaemonRestart: true,
    agentTransport: 'vsock',
    acceleration: 'kvm',
    // passt cannot drive the TAP device Firecracker needs without root (docs/backends.md).
    networkModes: ['none'],
    // Firecracker's block devices are raw files only: no copy-on-write children.
    diskClones: false,
    // Extra drives, yes; it has no 9p or virtio-fs device to share a host directory with.
    volumeKinds: ['disk'],
    // No CPU template: the guest sees the host's CPU.
    cpu: hostCpuFingerprint(),
  };
}

export async function isFile(file: string): Promise<boolean> {
  try {
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await fs.access(file, fsc.X_OK);
    return (await fs.stat(file)).isFile();
  } catch {
    return false;
  }
}

/** `binary` option, else AEGIS_FIRECRACKER, else the first `firecracker` on PATH. */
export async function findBinary(explicit: string | undefined): Promise<{ binary?: string; missing?: string }> {
  const given = explicit ?? process.env['AEGIS_FIRECRACKER'];
  if (given) {
    return (await isExecutable(given))
      ? { binary: given }
      : { missing: `firecracker binary ${given} is missing or not executable (${INSTALL_HINT})` };
  }
  for (const dir of (process.env['PATH'] ?? '').split(path.delimiter)) {
    if (!dir) continue;
    const candidate = path.join(dir, BINARY);
    if (await isExecutable(candidate)) return { binary: candidate };
  }
  return { missing: `firecracker not found (${INSTALL_HINT})` };
}

/** Why the KVM device cannot be opened, with what to do about it; undefined when it can. */
async function kvmProblem(device: string): Promise<string | undefined> {
  const problem = await kvmDeviceProblem(device);
  if (!problem) return undefined;
  const exists = await fs.stat(device).then(
    () => true,
    () => false,
  );
  const hint = ' (enable virtualization in firmware, or nested virtualization on a cloud VM; load kvm_intel or kvm_amd)';
  return `${problem}: Firecracker needs KVM${exists ? '' : hint}`;
}

/** What `Backend.probe` answers (see `probeKvm` for when KVM is trusted). */
export async function probe(name: string, options: FirecrackerOptions): Promise<Probe> {
  try {
    const missing: string[] = [];
    if (process.arch !== 'x64' && process.arch !== 'arm64') missing.push(`Firecracker does not run on ${process.arch}`);
    const found = await findBinary(options.binary);
    if (found.missing) missing.push(found.missing);
    const device = options.kvmDevice ?? KVM_DEVICE;
    const kvm = await kvmProblem(device);
    if (kvm) missing.push(kvm);
    if (missing.length > 0 || !found.binary) return { available: false, detail: missing.join('; ') };
    let version: string;
    try {
      // Firecracker prints the version, then (v1.x) a log line about exiting: keep the first.
      const { stdout } = await execFileP(found.binary, ['--version'], { timeout: 10_000 });
      version = stdout.split('\n')[0]?.trim() || found.binary;
    } catch (err) {
      return { available: false, detail: `${found.binary} does not run: ${(err as Error).message.split('\n')[0] ?? ''}` };
    }
    return await probeKvm(name, options, `${version} (${found.binary})`, found.binary, device);
  } catch (err) {
    return { available: false, detail: `probe failed: ${(err as Error).message}` };
  }
}

/**
 * Firecracker has no software fallback, so it is offered only on a KVM known to run the
 * guest: a cached verdict, else a test boot in the background (`settled`) while the answer
 * stays "not available".
 */
async function probeKvm(name: string, options: FirecrackerOptions, found: string, binary: string, device: string): Promise<Probe> {
  const mode = accelMode();
  if (mode === 'tcg') return { available: false, detail: `${found}: AEGIS_ACCEL=tcg: Firecracker needs KVM` };
  if (mode === 'kvm') {
    return { available: true, detail: `${found}; KVM not tested (AEGIS_ACCEL=kvm); network: none only`, capabilities: capabilities() };
  }
  const { kernelPath, cacheDir } = options;
  const untested = `${found}; KVM could not be tested`;
  const trustIt = 'set AEGIS_ACCEL=kvm to use it untested';
  if (!kernelPath) return { available: false, detail: `${untested} (no guest kernel to boot); ${trustIt}` };
  if (!cacheDir) return { available: false, detail: `${untested} (no cache directory for the verdict); ${trustIt}` };
  if (!(await isFile(kernelPath))) return { available: false, detail: `${untested}: guest kernel ${kernelPath} is missing` };
  // The binary's path as well as its version: two installs of one version are two VMMs.
  const timeoutMs = options.kvmTestTimeoutMs ?? kvmTestTimeoutMs();
  const key = await verdictKey(found, kernelPath, device, timeoutMs);
  const gate = verdictGate(cacheDir);
  const known = await gate.cached(name, key);
  if (known) return fromVerdict(found, known);
  const settled = gate
    .decide(name, key, () => testBoot({ binary, kernelPath, timeoutMs, ...(options.spawn ? { spawn: options.spawn } : {}) }))
    .then(
      (verdict) => fromVerdict(found, verdict),
      (err: unknown): Probe => ({ available: false, detail: `${found}; KVM test could not run: ${(err as Error).message}` }),
    );
  return { available: false, detail: `${found}; KVM not tested yet (test boot running)`, settled };
}

function fromVerdict(found: string, verdict: AccelVerdict): Probe {
  if (!verdict.usable) return { available: false, detail: `${found}; KVM cannot run the guest: ${verdict.detail}` };
  return { available: true, detail: `${found}; KVM (tested: ${verdict.detail}); network: none only`, capabilities: capabilities() };
}
