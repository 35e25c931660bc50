import { execFileSync } from 'node:child_process';
import { accessSync, constants } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { isAegisError } from '@aegis/client';
import { QemuBackend } from '@aegis/vmm-qemu';
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
  try {
    const out = execFileSync(name, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], timeout: 10_000 });
    return { name, ok: true, detail: out.split('\n')[0]?.trim() ?? '' };
  } catch {
    return { name, ok: false, detail: `not found; ${hint}` };
  }
}

/** Checks this machine can run Aegis, without needing the daemon; says what to fix. */
export function doctorCommand(): Command {
  return new Command('doctor').description('check that this machine can run Aegis VMs').action(async () => {
    const home = process.env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis');
    const checks: Check[] = [];
    const probe = await new QemuBackend().probe();
    checks.push({ name: 'backend qemu', ok: probe.available, detail: probe.detail });
    checks.push({
      name: 'acceleration',
      ok: true,
      detail:
        probe.capabilities?.acceleration === 'kvm'
          ? 'KVM (/dev/kvm usable)'
          : 'TCG software emulation (no usable /dev/kvm): VMs boot in seconds, not milliseconds',
    });
    checks.push({ name: 'backend firecracker', ok: true, detail: 'not built into this version (skipped)' });
    checks.push({ name: 'backend libkrun', ok: true, detail: 'not built into this version (skipped)' });
    checks.push(toolCheck('mkfs.ext4', ['-V'], 'apt-get install e2fsprogs'));
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
