import { spawnSync } from 'node:child_process';
import { accessSync, constants, existsSync, realpathSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { isAegisError } from '@aegis/client';
import { QemuBackend } from '@aegis/vmm-qemu';
import { FirecrackerBackend } from '@aegis/vmm-firecracker';
import type { Probe } from '@aegis/vmm';
import { client, exit } from '../../util.js';

interface Check {
  name: string;
  ok: boolean;
  detail: string;
}

function fileCheck(name: string, file: string, hint: string): Check {
  try {
    accessSync(file, constants.R_OK);
    return { name, ok: true, detail: file };
  } catch {
    return { name, ok: false, detail: `${file} missing; ${hint}` };
  }
}

function toolCheck(name: string, args: string[], hint: string): Check {
  // e2fsprogs print their version on stderr.
  const r = spawnSync(name, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
  if (r.error || r.status !== 0) return { name, ok: false, detail: `not found; ${hint}` };
  return { name, ok: true, detail: (r.stdout || r.stderr).split('\n')[0]?.trim() ?? '' };
}

/** Checks this machine can run Aegis, without needing the daemon; says what to fix. */
export function doctorCommand(): Command {
  return new Command('doctor').description('check that this machine can run Aegis VMs').action(async () => {
    const home = process.env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis');
    const checks: Check[] = [];
    const kernelPath = process.env['AEGIS_KERNEL'] ?? path.join(home, 'cache/kernel/vmlinux');
    const rootfsPath = process.env['AEGIS_ROOTFS'] ?? path.join(home, 'cache/rootfs/base.erofs');
    // The daemon's own choice: the same verdict cache, beside the guest artifacts.
    const artifacts = existsSync(rootfsPath) ? path.dirname(path.dirname(realpathSync(rootfsPath))) : path.join(home, 'cache');
    const opts = { cacheDir: artifacts, ...(existsSync(kernelPath) ? { kernelPath: realpathSync(kernelPath) } : {}) };
    // doctor waits for a KVM test the daemon would run in the background (a few seconds at most).
    const settle = async (p: Probe): Promise<Probe> => (p.settled ? await p.settled : p);
    const probe = await settle(await new QemuBackend(opts).probe());
    checks.push({ name: 'backend qemu', ok: probe.available, detail: probe.detail });
    checks.push({
      name: 'acceleration',
      ok: true,
      detail:
        probe.capabilities?.acceleration === 'kvm'
          ? (probe.accelerationReason ?? 'KVM')
          : `${probe.accelerationReason ?? 'TCG'} (software emulation: VMs boot in seconds, not milliseconds)`,
    });
    // Optional backends: their absence is information, not a failure.
    const fc = await settle(await new FirecrackerBackend(opts).probe());
    checks.push({ name: 'backend firecracker', ok: true, detail: fc.available ? fc.detail : `not usable here: ${fc.detail}` });
    checks.push({ name: 'backend libkrun', ok: true, detail: 'not built into this version (skipped)' });
    checks.push(toolCheck('mkfs.ext4', ['-V'], 'apt-get install e2fsprogs'));
    // Images are prepared with mke2fs -d and debugfs; qemu-img makes warm instances' disks.
    checks.push(toolCheck('debugfs', ['-V'], 'apt-get install e2fsprogs (needed for --image)'));
    checks.push(toolCheck('qemu-img', ['--version'], 'apt-get install qemu-utils'));
    const userNet = probe.capabilities?.networkModes.includes('user') === true;
    checks.push({
      name: 'guest network',
      ok: userNet,
      detail: userNet
        ? 'passt: outbound TCP/UDP and DNS, host loopback unreachable'
        : 'passt not found: guests get --network none only (apt-get install passt)',
    });
    checks.push(
      fileCheck('guest kernel', process.env['AEGIS_KERNEL'] ?? path.join(home, 'cache/kernel/vmlinux'), 'build it with: make kernel'),
    );
    checks.push(
      fileCheck(
        'base rootfs',
        process.env['AEGIS_ROOTFS'] ?? path.join(home, 'cache/rootfs/base.erofs'),
        'build it with: make base-rootfs',
      ),
    );
    try {
      const s = await client().status();
      checks.push({ name: 'aegisd', ok: true, detail: `running (pid ${s.pid}), backend ${s.backend.name}` });
    } catch (err) {
      checks.push({
        name: 'aegisd',
        ok: !isAegisError(err, 'UNAVAILABLE') ? false : true,
        detail: 'not running (start it with: aegis up)',
      });
    }
    for (const c of checks) process.stdout.write(`${c.ok ? 'ok  ' : 'FAIL'}  ${c.name.padEnd(20)} ${c.detail}\n`);
    exit(checks.every((c) => c.ok) ? 0 : 1);
  });
}
