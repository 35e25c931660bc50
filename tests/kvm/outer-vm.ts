/**
 * The KVM path on a machine without KVM (issue 25; ../../docs/platforms.md): QEMU's TCG emulates
 * AMD SVM with nested paging, so a Linux booted under TCG ("L1") loads kvm_amd, has a real
 * /dev/kvm, and runs our VMs with `-accel kvm` inside it ("L2").
 *
 * L1 is Debian's own kernel package and busybox-static, fetched with `apt-get download` and
 * unpacked, never installed. Its initramfs loads the modules it needs, mounts this host's root
 * read-only over 9p under a tmpfs overlay (so everything here — node, QEMU, passt, the built
 * checkout, the guest artifacts — is there, and writable without touching the host), mounts a
 * results directory read-write over a second 9p share, and `switch_root`s onto it (a chroot
 * could not make the user namespaces passt needs) to run one script. When the script ends, L1's
 * PID 1 is gone, its kernel panics, and QEMU (`-no-reboot`) exits.
 */
import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';

/** What L1 needs as modules, by name; their dependencies are read from each module's .modinfo. */
const L1_MODULES = ['virtio_pci', 'virtio_net', '9pnet_virtio', '9p', 'overlay', 'kvm_amd'];

export interface OuterArtifacts {
  kernel: string;
  initramfs: string;
  /** The Debian package the kernel came from, e.g. linux-image-6.1.0-57-amd64. */
  kernelPackage: string;
}

function sh(cmd: string, args: string[], cwd?: string): string {
  return execFileSync(cmd, args, { cwd, encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/**
 * L1's kernel and initramfs, made once per Debian kernel package under `cacheDir` (the
 * metapackage linux-image-amd64 names the current one).
 */
export function outerArtifacts(cacheDir: string): OuterArtifacts {
  const aptDepends = (): string => {
    try {
      return sh('apt-cache', ['depends', 'linux-image-amd64']);
    } catch {
      return '';
    }
  };
  let depends = aptDepends();
  // A machine whose packages were all there never needed apt's lists: fetched once here.
  if (!depends.includes('Depends:') && process.getuid?.() === 0) {
    sh('apt-get', ['update', '-q']);
    depends = aptDepends();
  }
  const kernelPackage = /Depends: (linux-image-[^\s]+)/.exec(depends)?.[1];
  if (!kernelPackage) throw new Error(`apt-cache names no kernel for linux-image-amd64 (run apt-get update?):\n${depends}`);
  const dir = path.join(cacheDir, kernelPackage);
  const done = { kernel: path.join(dir, 'vmlinuz'), initramfs: path.join(dir, 'initramfs.gz'), kernelPackage };
  if (existsSync(done.initramfs)) return done;

  const work = path.join(cacheDir, `.work-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  mkdirSync(work, { recursive: true });
  try {
    // apt-get download writes into its working directory.
    sh('apt-get', ['download', '-q', kernelPackage, 'busybox-static'], work);
    for (const deb of readdirSync(work).filter((f) => f.endsWith('.deb'))) {
      sh('dpkg-deb', ['-x', path.join(work, deb), path.join(work, 'root')]);
    }
    const root = path.join(work, 'root');
    const vmlinuz = readdirSync(path.join(root, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new Error(`${kernelPackage} holds no /boot/vmlinuz-*`);
    const version = vmlinuz.slice('vmlinuz-'.length);
    const modules = orderedModules(path.join(root, 'lib/modules', version, 'kernel'), L1_MODULES);
    const files: CpioFile[] = [
      { name: 'bin/busybox', data: readFileSync(path.join(root, 'bin/busybox')), mode: 0o755 },
      { name: 'init', data: Buffer.from(INIT), mode: 0o755 },
      { name: 'modules.order', data: Buffer.from(modules.map((m) => m.name).join('\n') + '\n'), mode: 0o644 },
      ...modules.map((m) => ({ name: `lib/modules/${m.name}.ko`, data: readFileSync(m.file), mode: 0o644 })),
    ];
    const dirs = ['bin', 'dev', 'proc', 'sys', 'lib', 'lib/modules', 'lower', 'upper', 'newroot'];
    mkdirSync(dir, { recursive: true });
    writeFileSync(`${done.initramfs}.tmp`, gzipSync(cpio(dirs, files)));
    writeFileSync(done.kernel, readFileSync(path.join(root, 'boot', vmlinuz)));
    renameSync(`${done.initramfs}.tmp`, done.initramfs);
    return done;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

interface Module {
  name: string;
  file: string;
}

/** `wanted` and everything they depend on, each after its dependencies (what modprobe would load). */
function orderedModules(kernelDir: string, wanted: string[]): Module[] {
  const byName = new Map<string, string>();
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(path.join(d, e.name));
      else if (e.name.endsWith('.ko')) byName.set(e.name.slice(0, -3).replaceAll('-', '_'), path.join(d, e.name));
    }
  };
  walk(kernelDir);
  const ordered: Module[] = [];
  const seen = new Set<string>();
  const visit = (name: string): void => {
    if (seen.has(name)) return;
    seen.add(name);
    const file = byName.get(name);
    if (!file) throw new Error(`module ${name} is not in ${kernelDir} (built in, or renamed?)`);
    for (const dep of moduleDepends(readFileSync(file))) visit(dep.replaceAll('-', '_'));
    ordered.push({ name, file });
  };
  for (const name of wanted) visit(name);
  return ordered;
}

/** The `depends=` field of a module's .modinfo section: NUL-separated key=value strings. */
function moduleDepends(ko: Buffer): string[] {
  const at = ko.indexOf('\0depends=');
  if (at < 0) return [];
  const start = at + '\0depends='.length;
  const value = ko.subarray(start, ko.indexOf(0, start)).toString('latin1');
  return value ? value.split(',') : [];
}

interface CpioFile {
  name: string;
  data: Buffer;
  mode: number;
}

/** A newc ("070701") cpio archive, what the kernel unpacks as an initramfs. */
function cpio(dirs: string[], files: CpioFile[]): Buffer {
  const out: Buffer[] = [];
  let ino = 1;
  const entry = (name: string, mode: number, data: Buffer): void => {
    const fields = [ino++, mode, 0, 0, 1, 0, data.length, 0, 0, 0, 0, Buffer.byteLength(name) + 1, 0];
    const header = '070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join('');
    const pad = (n: number): Buffer => Buffer.alloc((4 - (n % 4)) % 4);
    const head = Buffer.from(header + name + '\0', 'latin1');
    out.push(head, pad(head.length), data, pad(data.length));
  };
  for (const d of dirs) entry(d, 0o040755, Buffer.alloc(0));
  for (const f of files) entry(f.name, 0o100000 | f.mode, f.data);
  entry('TRAILER!!!', 0, Buffer.alloc(0));
  return Buffer.concat(out);
}

/**
 * L1's /init. The results share is mounted at the path it has on this host, so the script and
 * what it writes are at the same paths on both sides.
 */
const INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m.ko || echo "aegis-l1: insmod $m failed"; done
for a in $(cat /proc/cmdline); do case "$a" in aegis.results=*) results="\${a#aegis.results=}" ;; esac; done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts,cache=loose,ro hostroot /lower || exec echo "aegis-l1: no host root"
mount -t tmpfs -o size=12g tmpfs /upper
mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot || exec echo "aegis-l1: no overlay"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mkdir -p "/newroot$results"
mount -t 9p -o $opts results "/newroot$results" || exec echo "aegis-l1: no results share"
echo "aegis-l1: up, kvm: $(ls /dev/kvm 2>&1)"
exec switch_root /newroot /bin/sh "$results/run.sh"
`;

export interface OuterRun {
  exitCode: number | undefined;
  /** L1's console: its kernel's messages and what the script printed. */
  console: string;
  durationMs: number;
}

/**
 * Boots L1 under TCG and runs `script` (a shell script) in it as root, on this host's
 * filesystem (read-only below a tmpfs), with `resultsDir` shared read-write at its own path.
 * The script's exit code is what it writes to `$results/exit`.
 */
export async function runInOuterVm(
  artifacts: OuterArtifacts,
  resultsDir: string,
  script: string,
  options: { memoryMiB?: number; cpus?: number; timeoutMs: number; onConsole?: (text: string) => void },
): Promise<OuterRun> {
  mkdirSync(resultsDir, { recursive: true });
  writeFileSync(path.join(resultsDir, 'run.sh'), `${script}\n`, { mode: 0o755 });
  rmSync(path.join(resultsDir, 'exit'), { force: true });
  const qemu = os.arch() === 'x64' ? 'qemu-system-x86_64' : undefined;
  if (!qemu) throw new Error('the nested-KVM path needs an x86_64 host (TCG emulates AMD SVM)');
  const args = [
    '-accel',
    'tcg',
    // An AMD model: TCG emulates SVM (with nested paging), not VMX.
    '-cpu',
    'EPYC',
    '-m',
    String(options.memoryMiB ?? 6144),
    '-smp',
    String(options.cpus ?? 2),
    '-nographic',
    '-no-reboot',
    '-kernel',
    artifacts.kernel,
    '-initrd',
    artifacts.initramfs,
    '-append',
    `console=ttyS0 panic=-1 quiet aegis.results=${resultsDir}`,
    '-nic',
    'user,model=virtio-net-pci',
    '-virtfs',
    'local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap',
    '-virtfs',
    `local,path=${resultsDir},mount_tag=results,security_model=none,multidevs=remap`,
  ];
  const t0 = performance.now();
  const child = spawn(qemu, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const log = createWriteStream(path.join(resultsDir, 'console.log'));
  let text = '';
  const take = (chunk: Buffer): void => {
    const s = chunk.toString('utf8');
    text += s;
    log.write(chunk);
    options.onConsole?.(s);
  };
  child.stdout.on('data', take);
  child.stderr.on('data', take);
  const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs);
  await new Promise<void>((resolve) => child.once('close', () => resolve()));
  clearTimeout(timer);
  log.end();
  const exitFile = path.join(resultsDir, 'exit');
  const exitCode = existsSync(exitFile) ? Number(readFileSync(exitFile, 'utf8').trim()) : undefined;
  return { exitCode, console: text, durationMs: performance.now() - t0 };
}
