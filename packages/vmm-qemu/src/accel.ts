/**
 * KVM or TCG for the VMs this backend creates, and why: AEGIS_ACCEL, the device, a cached
 * verdict, else a test boot in the background (kvm-test.ts) while VMs boot under TCG. Also the
 * capabilities that follow from it, which is what `probe` reports.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import {
  hostCpuFingerprint,
  kvmTestTimeoutMs,
  KVM_DEVICE,
  verdictGate,
  type VerdictGate,
  accelMode,
  kvmDeviceProblem,
  verdictKey,
  type Capabilities,
} from '@aegis/vmm';
import { profile } from './args.js';
import { testKvmBoot } from './kvm-test.js';

const execFileP = promisify(execFile);

/** Whether VMs get KVM, and why, in one line for `doctor` and `status`. */
export interface AccelDecision {
  kvm: boolean;
  why: string;
  /** The test boot still running: TCG until it settles. */
  settled?: Promise<AccelDecision>;
}

export function capabilitiesFor(kvm: boolean, passt: boolean): Capabilities {
  return {
    pause: true,
    snapshot: true,
    survivesDaemonRestart: true,
    agentTransport: 'virtio-serial',
    acceleration: kvm ? 'kvm' : 'tcg',
    networkModes: passt ? ['user', 'none'] : ['none'],
    // qcow2 children (`qemu-img create -b`): a clone's disk in a few milliseconds.
    diskClones: true,
    volumeKinds: ['disk', 'share'],
    cpu: kvm ? hostCpuFingerprint() : profile().tcgCpu,
  };
}

/** What the KVM test needs; without a kernel or a cache directory KVM is never tested. */
export interface KvmTestOptions {
  /** The guest kernel: what the KVM test boots. Without it KVM cannot be tested (TCG). */
  kernelPath?: string;
  /** Where KVM verdicts are kept (`accel-verdicts.json`). Without it KVM is never tested. */
  cacheDir?: string;
  kvmDevice?: string;
  kvmTestDeadlineMs?: number;
}

/** The backend's one acceleration decision, shared by `probe` and `create`. */
export class AccelChoice {
  /** Settled decision for VMs created from now on; undefined until first asked. */
  current: AccelDecision | undefined;
  private readonly gate: VerdictGate | undefined;

  constructor(
    private readonly name: string,
    private readonly options: KvmTestOptions,
    private readonly binary: () => string,
  ) {
    this.gate = options.cacheDir ? verdictGate(options.cacheDir) : undefined;
  }

  /**
   * KVM or TCG, and why. A cached verdict answers at once; otherwise the test boot starts in
   * the background and VMs boot under TCG until it settles, so nothing fails on first contact.
   */
  async decide(version: string): Promise<AccelDecision> {
    if (this.current) return this.current;
    const device = this.options.kvmDevice ?? KVM_DEVICE;
    const mode = accelMode();
    const problem = mode === 'tcg' ? undefined : await kvmDeviceProblem(device);
    let d: AccelDecision;
    if (mode === 'tcg') d = { kvm: false, why: 'TCG (AEGIS_ACCEL=tcg)' };
    else if (problem) d = { kvm: false, why: `TCG (software emulation): ${problem}` };
    else if (mode === 'kvm') d = { kvm: true, why: 'KVM (AEGIS_ACCEL=kvm: used without a test boot)' };
    else if (!this.gate || !this.options.kernelPath)
      d = { kvm: false, why: `TCG: ${device} present but not tested (no guest kernel to test it with)` };
    else {
      const deadlineMs = this.options.kvmTestDeadlineMs ?? kvmTestTimeoutMs();
      const key = await verdictKey(version, this.options.kernelPath, device, deadlineMs);
      const known = await this.gate.cached(this.name, key);
      if (known) d = fromVerdict(device, known.usable, known.detail);
      else {
        const gate = this.gate;
        const kernelPath = this.options.kernelPath;
        const settled = gate
          .decide(this.name, key, () =>
            testKvmBoot({
              binary: this.binary(),
              machine: profile().machine,
              console: profile().console,
              kernelPath,
              deadlineMs,
            }),
          )
          .then(
            (v) => fromVerdict(device, v.usable, v.detail),
            (err: unknown) => ({ kvm: false, why: `TCG: the KVM test could not run: ${(err as Error).message}` }),
          )
          .then((final) => (this.current = final));
        d = { kvm: false, why: `TCG while ${device} is being tested (a boot of the guest kernel under KVM)`, settled };
      }
    }
    this.current = d;
    return d;
  }
}

function fromVerdict(device: string, usable: boolean, detail: string): AccelDecision {
  return usable
    ? { kvm: true, why: `KVM (tested: ${detail})` }
    : { kvm: false, why: `${device} present but it cannot run the guest: ${detail}; using TCG` };
}

export async function qemuVersion(binary: string): Promise<string> {
  try {
    const { stdout } = await execFileP(binary, ['--version'], { timeout: 10_000 });
    return stdout.split('\n')[0]?.trim() ?? binary;
  } catch {
    return binary;
  }
}
