/**
 * The test boot behind the QEMU backend's KVM verdict: the guest kernel, under `-accel kvm` with
 * the same CPU model instances get, and no disks. A kernel that runs reaches the root mount and
 * panics there ("VFS: Unable to mount root fs"); with `panic=-1` and `-no-reboot` QEMU then
 * exits. That panic is the proof of life: it comes after the whole early boot, right before
 * init. Everything else is a failure, with QEMU's own words when it had any:
 * - QEMU aborts at once (a `kvm-pvm` host: "failed to set MSR 0x10a");
 * - KVM reports an internal error (QMP `query-status` says `internal-error`, or QEMU prints it);
 * - no sign of life before the deadline (a guest spinning in KVM prints nothing).
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { AccelVerdict } from '@aegis/vmm';
import { QmpClient } from './qmp.js';

export interface KvmTestOptions {
  binary: string;
  machine: string;
  kernelPath: string;
  console: string;
  /** A working KVM reaches the root mount in well under a second. */
  deadlineMs: number;
}

/** What the guest kernel prints once it has booted as far as the root mount or init. */
const REACHED_INIT = /Kernel panic - not syncing|VFS: Unable to mount root|Run \/\S+ as init/;
/** QEMU's words for a KVM that failed while running the guest. */
const KVM_FAILED = /KVM internal error|kvm run failed|failed to set MSR|kvm_buf_set_msrs|emulation failure/i;

/** The lines of QEMU's stderr that explain a failure, in one line. */
function qemuWords(stderr: string): string {
  const lines = stderr
    .split('\n')
    .map((l) => l.trim())
    .filter(
      (l) => l !== '' && !/^(RAX|RBX|RCX|RDX|RSI|RDI|RSP|RBP|R\d+|RIP|ES|CS|SS|DS|FS|GS|LDT|TR|GDT|IDT|CR0|DR\d|EFER|Code)\b/.test(l),
    );
  const telling = lines.filter((l) => /error|fail|assert|abort|cannot|unable/i.test(l));
  return (telling.length > 0 ? telling : lines).slice(0, 2).join(' | ').slice(0, 300);
}

export async function testKvmBoot(o: KvmTestOptions): Promise<AccelVerdict> {
  const started = Date.now();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-kvm-test-'));
  const qmpPath = path.join(dir, 'qmp.sock');
  const args = [
    '-name',
    'aegis-kvm-test',
    '-machine',
    o.machine,
    '-accel',
    'kvm',
    '-cpu',
    'host',
    '-m',
    '128',
    '-smp',
    '1',
    '-nodefaults',
    '-no-user-config',
    '-display',
    'none',
    '-no-reboot',
    '-kernel',
    o.kernelPath,
    '-append',
    `console=${o.console} panic=-1 reboot=t cryptomgr.notests root=/dev/vda`,
    '-serial',
    'stdio',
    '-qmp',
    `unix:${qmpPath},server=on,wait=off`,
  ];
  const child = spawn(o.binary, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  const verdict = await new Promise<{ usable: boolean; detail: string }>((resolve) => {
    let done = false;
    let qmp: QmpClient | undefined;
    const finish = (v: { usable: boolean; detail: string }): void => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      clearInterval(poll);
      qmp?.close();
      resolve(v);
    };
    const fail = (why: string): void => finish({ usable: false, detail: why });
    const check = (): void => {
      if (REACHED_INIT.test(out))
        finish({ usable: true, detail: `the guest kernel booted under KVM in ${Date.now() - started} ms (deadline ${o.deadlineMs} ms)` });
      else if (KVM_FAILED.test(err)) fail(qemuWords(err));
    };
    child.stdout.on('data', (d: Buffer) => {
      if (out.length < 1 << 20) out += d.toString('latin1');
      check();
    });
    child.stderr.on('data', (d: Buffer) => {
      if (err.length < 1 << 16) err += d.toString('utf8');
      check();
    });
    child.once('error', (e) => fail(`cannot run ${o.binary}: ${e.message}`));
    child.once('exit', (code, sig) => {
      // Output may still be in the pipes: judge once they are drained.
      setImmediate(() => {
        check();
        fail(qemuWords(err) || `QEMU ended (${sig ?? `status ${code}`}) before the guest kernel showed any sign of life`);
      });
    });
    const timer = setTimeout(() => {
      const printed = out.trim() === '' ? 'no sign of life' : 'the guest kernel did not reach init';
      fail(`${printed} within ${o.deadlineMs} ms (AEGIS_KVM_TEST_TIMEOUT_MS)${err ? `: ${qemuWords(err)}` : ''}`);
    }, o.deadlineMs);
    // A KVM internal error stops the VM without ending QEMU: ask QEMU for its run state.
    let asking = false;
    const poll = setInterval(() => {
      if (asking || done) return;
      asking = true;
      void (async () => {
        try {
          qmp ??= await QmpClient.connect(qmpPath, { timeoutMs: 200 });
          if (done) return qmp.close();
          const st = (await qmp.execute('query-status')) as { status?: string };
          if (st.status === 'internal-error') fail(`KVM internal error${err ? `: ${qemuWords(err)}` : ''}`);
        } catch {
          qmp = undefined; // not listening yet, or gone: the exit handler decides
        } finally {
          asking = false;
        }
      })();
    }, 100);
  });
  if (child.exitCode === null && child.signalCode === null) {
    const gone = new Promise((r) => child.once('exit', r));
    child.kill('SIGKILL');
    await gone;
  }
  await fs.rm(dir, { recursive: true, force: true });
  return { ...verdict, costMs: Date.now() - started, testedAt: new Date().toISOString() };
}
