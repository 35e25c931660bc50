/**
 * QEMU backend: one detached QEMU process per VM, `microvm` machine on x86_64 (`virt` on
 * arm64), KVM when a test boot showed it can run the guest and TCG otherwise (accel.ts,
 * kvm-test.ts). Control through QMP; the agent channel is a virtio-serial port whose host end
 * is a unix socket QEMU listens on. This file is the `Backend`: what it offers (probe), and
 * making, finding and cleaning up VMs; the command line is args.ts, a running VM vm.ts.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { AegisError } from '@aegis/protocol';
import {
  DetachedProcess,
  PASST_INSTALL_HINT,
  findStrays,
  isPasst,
  passtAvailable,
  type StrayProcess,
  type Backend,
  type Probe,
  type Vm,
  type VmConfig,
  type VmRecord,
} from '@aegis/vmm';
import { AccelChoice, capabilitiesFor, qemuVersion, type AccelDecision, type KvmTestOptions } from './accel.js';
import { profile, qemuArgs } from './args.js';
import { QemuVm, isOurQemu, parseRecord } from './vm.js';

const execFileP = promisify(execFile);

export interface QemuBackendOptions extends KvmTestOptions {
  binary?: string;
}

export class QemuBackend implements Backend {
  readonly name = 'qemu' as const;
  private readonly accel: AccelChoice;

  constructor(private readonly options: QemuBackendOptions = {}) {
    this.accel = new AccelChoice(this.name, options, () => this.binary());
  }

  private binary(): string {
    return this.options.binary ?? profile().binary;
  }

  async probe(): Promise<Probe> {
    let binary: string;
    try {
      binary = this.options.binary ?? profile().binary;
    } catch (err) {
      return { available: false, detail: (err as Error).message };
    }
    let version: string;
    try {
      const { stdout } = await execFileP(binary, ['--version'], { timeout: 10_000 });
      version = stdout.split('\n')[0]?.trim() ?? binary;
    } catch {
      return { available: false, detail: `${binary} not found (Debian: apt-get install qemu-system-x86)` };
    }
    const passt = await passtAvailable();
    const answer = (accel: AccelDecision): Probe => ({
      available: true,
      detail: `${version}; ${accel.why}; ` + (passt ? 'network: passt' : `network: none (passt not found; ${PASST_INSTALL_HINT})`),
      capabilities: capabilitiesFor(accel.kvm, passt),
      accelerationReason: accel.why,
      version,
    });
    const accel = await this.accel.decide(version);
    const probe: Probe = { ...answer(accel), version };
    if (accel.settled) probe.settled = accel.settled.then(answer);
    return probe;
  }

  async create(config: VmConfig): Promise<Vm> {
    if (config.network === 'user' && !(await passtAvailable())) {
      throw new AegisError(
        'UNSUPPORTED',
        `--network unfiltered needs passt (${PASST_INSTALL_HINT}); the default network (the egress policy) does not`,
      );
    }
    const kvm = (this.accel.current ?? (await this.accel.decide(await qemuVersion(this.binary())))).kvm;
    const args = await qemuArgs(config, kvm);
    return new QemuVm(config.id, config.stateDir, {
      binary: this.binary(),
      args,
      kvm,
      ...(config.restoreFrom ? { restoreFrom: config.restoreFrom } : {}),
      ramInFile: config.snapshotMemory !== undefined,
      userNetwork: config.network === 'user',
    });
  }

  async attach(record: VmRecord): Promise<Vm> {
    const r = parseRecord(record);
    if (!r) throw new AegisError('INVALID_ARGUMENT', 'not a QEMU VM record');
    const proc = await DetachedProcess.adopt(r, isOurQemu(r.id));
    if (!proc) throw new AegisError('NOT_FOUND', `QEMU process of VM ${r.id} is gone`);
    const vm = new QemuVm(r.id, r.stateDir, undefined);
    await vm.adopt(proc);
    return vm;
  }

  /** A qcow2 child naming `base` (raw) as its backing file: the instance's own layer in milliseconds. */
  async cloneDisk(base: string, file: string): Promise<void> {
    try {
      await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', file], { timeout: 30_000 });
      await fs.chmod(file, 0o600);
    } catch (err) {
      throw new AegisError('UNAVAILABLE', `cannot create the VM's disk (is qemu-utils installed?): ${(err as Error).message}`);
    }
  }

  async copyDisk(source: string, sourceCloned: boolean, dest: string, signal?: AbortSignal): Promise<void> {
    try {
      // Sparse output (-S 4k is the default): only what the guest wrote takes space.
      await execFileP('qemu-img', ['convert', '-q', '-f', sourceCloned ? 'qcow2' : 'raw', '-O', 'raw', source, dest], {
        timeout: 600_000,
        ...(signal ? { signal } : {}),
      });
      await fs.chmod(dest, 0o600);
    } catch (err) {
      await fs.rm(dest, { force: true });
      throw new AegisError('UNAVAILABLE', `cannot copy the VM's disk: ${(err as Error).message}`);
    }
  }

  async strays(dir: string, keep: VmRecord[]): Promise<StrayProcess[]> {
    const kept = keep.map(parseRecord).flatMap((r) => (r ? [{ identity: r, stateDir: r.stateDir }] : []));
    return findStrays(dir, kept, (argv) => {
      if (path.basename(argv[0] ?? '').startsWith('qemu-system')) return { what: 'QEMU', helper: false };
      // passt goes with its VM's QEMU (--one-off): a kept VM's is kept.
      return isPasst(argv) ? { what: 'passt', helper: true } : undefined;
    });
  }
}
