/**
 * The backend against a stand-in `firecracker` (test/fake-firecracker.mjs, a node script that
 * serves the API on --api-sock and records every request, and plays the KVM test boot): there
 * is no KVM here, so these tests check what we send and how we react, not that a guest boots.
 */
import { spawn, type SpawnOptions } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import { processAlive, type Backend, type Probe, type Vm, type VmConfig } from '@aegis/vmm';
import { VERDICT_FILE } from '@aegis/vmm';
import { FirecrackerBackend, type FirecrackerOptions } from './backend.js';
import { CONSOLE_MAX_BYTES } from './console.js';

const FAKE = fileURLToPath(new URL('../test/fake-firecracker.mjs', import.meta.url));
const BOOT_ARGS = 'console=ttyS0 reboot=k panic=-1 pci=off root=/dev/vda rootfstype=erofs ro init=/aegis/init aegis_agent=vsock';

let dir: string;
let requestLog: string;
let fakeEnv: Record<string, string>;
const vms: Vm[] = [];

/** A backend whose "firecracker" is the fake, run by node with the arguments the backend chose. */
function backend(): FirecrackerBackend {
  return new FirecrackerBackend({
    binary: process.execPath,
    connectTimeoutMs: 2000,
    spawn: (_binary: string, args: string[], options: SpawnOptions) =>
      spawn(process.execPath, [FAKE, ...args], { ...options, env: { ...process.env, FAKE_FC_LOG: requestLog, ...fakeEnv } }),
  });
}

function config(over: Partial<VmConfig> = {}): VmConfig {
  const stateDir = path.join(dir, over.id ?? 'vm1');
  fs.mkdirSync(stateDir, { recursive: true });
  return {
    id: 'vm1',
    stateDir,
    kernelPath: path.join(dir, 'vmlinux'),
    rootfsPath: path.join(dir, 'rootfs.erofs'),
    scratchDiskPath: path.join(dir, 'scratch.img'),
    memoryMiB: 256,
    vcpuCount: 2,
    network: 'none',
    kernelArgs: ['aegis_hostname=h1'],
    ...over,
  };
}

function requests(): { method: string; path: string; body: unknown }[] {
  if (!fs.existsSync(requestLog)) return [];
  return fs
    .readFileSync(requestLog, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { method: string; path: string; body: unknown });
}

async function started(cfg: VmConfig): Promise<Vm> {
  const vm = await backend().create(cfg);
  vms.push(vm);
  await vm.start();
  return vm;
}

async function failure(p: Promise<unknown>): Promise<AegisError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(AegisError);
  return err as AegisError;
}

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-fc-'));
  requestLog = path.join(dir, 'requests.jsonl');
  fakeEnv = {};
});

afterEach(async () => {
  for (const vm of vms.splice(0)) await vm.stop({ timeoutMs: 200 }).catch(() => undefined);
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('FirecrackerBackend.probe', () => {
  it('says what is missing here (no firecracker binary, no /dev/kvm) without throwing', async () => {
    const savedPath = process.env['PATH'];
    const savedFc = process.env['AEGIS_FIRECRACKER'];
    process.env['PATH'] = dir;
    delete process.env['AEGIS_FIRECRACKER'];
    try {
      const probe = await new FirecrackerBackend().probe();
      expect(probe.available).toBe(false);
      expect(probe.detail).toContain(
        'firecracker not found (download a release binary from github.com/firecracker-microvm/firecracker/releases',
      );
      if (!fs.existsSync('/dev/kvm')) expect(probe.detail).toContain('/dev/kvm is missing: Firecracker needs KVM (enable virtualization');
    } finally {
      process.env['PATH'] = savedPath;
      if (savedFc !== undefined) process.env['AEGIS_FIRECRACKER'] = savedFc;
    }
  });

  it('names a configured binary that is not there', async () => {
    const probe = await new FirecrackerBackend({ binary: path.join(dir, 'nope') }).probe();
    expect(probe.available).toBe(false);
    expect(probe.detail).toContain(`firecracker binary ${path.join(dir, 'nope')} is missing or not executable`);
  });

  it('says so when the KVM device cannot be opened', async () => {
    const probe = await probing({ kvmDevice: path.join(dir, 'no-kvm') }).probe();
    expect(probe.available).toBe(false);
    expect(probe.detail).toContain(`${path.join(dir, 'no-kvm')} is missing: Firecracker needs KVM (enable virtualization`);
    expect(runs()).toBe(0);
  });
});

/**
 * A `firecracker` on disk as the probe finds it: a script running the stand-in with these knobs,
 * so `--version` and the test boot both reach the stand-in.
 */
function standIn(env: Record<string, string> = {}): string {
  const file = path.join(dir, 'firecracker');
  const vars = { FAKE_FC_LOG: requestLog, FAKE_FC_RUNS: path.join(dir, 'runs'), ...env };
  const exports = Object.entries(vars).map(([k, v]) => `export ${k}='${v}'`);
  fs.writeFileSync(file, ['#!/bin/sh', ...exports, `exec '${process.execPath}' '${FAKE}' "$@"`, ''].join('\n'), { mode: 0o755 });
  return file;
}

/** A backend that can test KVM: a guest kernel, a cache directory, a "KVM device" that opens. */
function probing(over: Partial<FirecrackerOptions> = {}, env: Record<string, string> = {}): FirecrackerBackend {
  const kvmDevice = path.join(dir, 'kvm');
  const kernelPath = path.join(dir, 'vmlinux');
  if (!fs.existsSync(kvmDevice)) fs.writeFileSync(kvmDevice, '');
  if (!fs.existsSync(kernelPath)) fs.writeFileSync(kernelPath, 'not really a kernel');
  return new FirecrackerBackend({
    binary: standIn(env),
    kernelPath,
    cacheDir: path.join(dir, 'cache'),
    kvmDevice,
    kvmTestTimeoutMs: 3000,
    ...over,
  });
}

/** How many test boots the stand-in has run. */
function runs(): number {
  const file = path.join(dir, 'runs');
  return fs.existsSync(file) ? fs.readFileSync(file, 'utf8').split('\n').filter(Boolean).length : 0;
}

/** What the stand-in recorded about its test boots. */
function testBoots(): { args: string[]; cwd: string; pid: number; config: unknown }[] {
  return (requests() as unknown[]).filter((r): r is { args: string[]; cwd: string; pid: number; config: unknown } =>
    Array.isArray((r as { args?: unknown }).args),
  );
}

async function settle(probe: Probe): Promise<Probe> {
  expect(probe.available).toBe(false);
  expect(probe.detail).toContain('KVM not tested yet');
  expect(probe.settled).toBeDefined();
  return (await probe.settled) as Probe;
}

describe('FirecrackerBackend.probe: is KVM able to run the guest?', () => {
  let savedAccel: string | undefined;
  beforeEach(() => {
    savedAccel = process.env['AEGIS_ACCEL'];
    delete process.env['AEGIS_ACCEL'];
  });
  afterEach(() => {
    if (savedAccel === undefined) delete process.env['AEGIS_ACCEL'];
    else process.env['AEGIS_ACCEL'] = savedAccel;
  });

  it('boots the guest kernel once; a kernel panic proves KVM runs it, and the verdict is cached', async () => {
    const final = await settle(await probing().probe());
    expect(final.available).toBe(true);
    expect(final.detail).toContain(
      'Firecracker v1.99.0-fake (' +
        path.join(dir, 'firecracker') +
        '); KVM (tested: the guest kernel ran under KVM: VFS: Cannot open root device',
    );
    expect(final.capabilities?.acceleration).toBe('kvm');
    expect(runs()).toBe(1);

    const [boot] = testBoots();
    expect(boot?.args).toEqual([
      '--no-api',
      '--config-file',
      path.join(boot?.cwd ?? '', 'vm.json'),
      '--id',
      'aegis-kvm-probe',
      '--show-level',
    ]);
    expect(boot?.config).toEqual({
      'boot-source': {
        kernel_image_path: path.join(dir, 'vmlinux'),
        boot_args: 'console=ttyS0 reboot=k panic=-1 pci=off init=/aegis-kvm-probe-no-such-init',
      },
      drives: [],
      'machine-config': { vcpu_count: 1, mem_size_mib: 128 },
    });
    expect(fs.existsSync(boot?.cwd ?? '')).toBe(false);

    const cache = JSON.parse(fs.readFileSync(path.join(dir, 'cache', VERDICT_FILE), 'utf8')) as Record<string, unknown>;
    const [[key, verdict]] = Object.entries(cache) as [[string, { usable: boolean; costMs: number }]];
    expect(key).toMatch(/^firecracker:[0-9a-f]{24}$/);
    expect(verdict.usable).toBe(true);
    expect(verdict.costMs).toBeGreaterThanOrEqual(0);

    // Another backend over the same cache (a restarted daemon) reads the verdict and boots nothing.
    const again = await probing().probe();
    expect(again.available).toBe(true);
    expect(again.settled).toBeUndefined();
    expect(runs()).toBe(1);
  });

  it("says KVM cannot run the guest, in Firecracker's own words, when Firecracker exits early", async () => {
    const final = await settle(await probing({}, { FAKE_FC_BOOT: 'fail' }).probe());
    expect(final.available).toBe(false);
    expect(final.detail).toContain(
      'KVM cannot run the guest: Firecracker exited with status 1 before the guest kernel reached its root mount: Could not Start MicroVM from one single json: Cannot create VM: fake: the VM could not be created',
    );
    const again = await probing({}, { FAKE_FC_BOOT: 'fail' }).probe();
    expect(again).toEqual({ available: false, detail: final.detail });
    expect(runs()).toBe(1);
  });

  it('stops at the first vCPU failure Firecracker logs, without waiting for the deadline, and kills it', async () => {
    const t0 = Date.now();
    const final = await settle(await probing({ kvmTestTimeoutMs: 10_000 }, { FAKE_FC_BOOT: 'vcpu-error' }).probe());
    expect(Date.now() - t0).toBeLessThan(5000);
    expect(final.available).toBe(false);
    expect(final.detail).toContain('KVM cannot run the guest: Firecracker: Failure during vcpu run: Invalid argument (os error 22)');
    expect(processAlive(testBoots()[0]?.pid ?? 0)).toBe(false);
  });

  it('gives up on a test boot with no sign of life at the deadline, kills it and removes its files', async () => {
    const t0 = Date.now();
    const final = await settle(await probing({ kvmTestTimeoutMs: 300 }, { FAKE_FC_BOOT: 'hang' }).probe());
    expect(Date.now() - t0).toBeLessThan(3000);
    expect(final.available).toBe(false);
    expect(final.detail).toContain('KVM cannot run the guest: no sign of life within 300 ms');
    const [boot] = testBoots();
    expect(processAlive(boot?.pid ?? 0)).toBe(false);
    expect(fs.existsSync(boot?.cwd ?? '')).toBe(false);
  });

  it('runs one test boot for two probes that ask while it runs', async () => {
    // The boot hangs for the whole test timeout: long enough that the second probe asks while it
    // still runs however slow this machine is at the moment (300 ms raced a loaded host).
    const [a, b] = await Promise.all([
      probing({ kvmTestTimeoutMs: 3000 }, { FAKE_FC_BOOT: 'hang' }).probe(),
      probing({ kvmTestTimeoutMs: 3000 }, { FAKE_FC_BOOT: 'hang' }).probe(),
    ]);
    expect((await settle(a)).detail).toBe((await settle(b)).detail);
    expect(runs()).toBe(1);
  });

  it('AEGIS_ACCEL=tcg: not available, and nothing is booted', async () => {
    process.env['AEGIS_ACCEL'] = 'tcg';
    const probe = await probing().probe();
    expect(probe.available).toBe(false);
    expect(probe.detail).toContain('AEGIS_ACCEL=tcg: Firecracker needs KVM');
    expect(probe.settled).toBeUndefined();
    expect(runs()).toBe(0);
  });

  it('AEGIS_ACCEL=kvm: available without a test, and says it was not tested', async () => {
    process.env['AEGIS_ACCEL'] = 'kvm';
    const probe = await probing({ kernelPath: undefined }).probe();
    expect(probe.available).toBe(true);
    expect(probe.detail).toContain('KVM not tested (AEGIS_ACCEL=kvm)');
    expect(runs()).toBe(0);
  });

  it('never offers an untested KVM: without a guest kernel (or one that is missing) it is not available', async () => {
    const none = await probing({ kernelPath: undefined }).probe();
    expect(none.available).toBe(false);
    expect(none.detail).toContain('KVM could not be tested (no guest kernel to boot)');
    expect(none.settled).toBeUndefined();
    const gone = await probing({ kernelPath: path.join(dir, 'no-vmlinux') }).probe();
    expect(gone.available).toBe(false);
    expect(gone.detail).toContain(`KVM could not be tested: guest kernel ${path.join(dir, 'no-vmlinux')} is missing`);
    expect(runs()).toBe(0);
  });
});

describe('FirecrackerBackend.create', () => {
  it("refuses network 'user' with UNSUPPORTED and says what to do", async () => {
    const err = await failure(backend().create(config({ network: 'user' })));
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toContain('--network none');
  });

  it('refuses a cloned scratch disk with UNSUPPORTED: Firecracker takes raw images only', async () => {
    expect((backend() as Backend).cloneDisk).toBeUndefined();
    const err = await failure(backend().create(config({ scratchDiskCloned: true })));
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toContain('raw disk images only');
  });

  it('refuses an id Firecracker would refuse, a memory file to write on restore, and a missing snapshot', async () => {
    expect((await failure(backend().create(config({ id: 'bad_id' })))).code).toBe('INVALID_ARGUMENT');
    const snap = path.join(dir, 'snap.bin');
    fs.writeFileSync(snap, 'x');
    const shared = config({ restoreFrom: snap, snapshotMemory: { path: path.join(dir, 'mem'), access: 'write' } });
    expect((await failure(backend().create(shared))).code).toBe('UNSUPPORTED');
    expect((await failure(backend().create(config({ restoreFrom: snap })))).code).toBe('NOT_FOUND'); // no snap.bin.mem
  });

  it('refuses a host directory with UNSUPPORTED (no 9p or virtio-fs in Firecracker), and volumes on a restore', async () => {
    const share = { kind: 'share' as const, hostPath: dir, guestPath: '/work', readOnly: false };
    const err = await failure(backend().create(config({ volumes: [share] })));
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toContain('named volume');
    const snap = path.join(dir, 'snap.bin');
    fs.writeFileSync(snap, 'x');
    const disk = { kind: 'disk' as const, hostPath: path.join(dir, 'v.ext4'), guestPath: '/v', readOnly: false };
    expect((await failure(backend().create(config({ restoreFrom: snap, volumes: [disk] })))).code).toBe('UNSUPPORTED');
  });

  it('does not start anything', async () => {
    await backend().create(config());
    expect(requests()).toEqual([]);
    expect(fs.readlinkSync(path.join(dir, 'vm1', 'scratch.disk'))).toBe(path.join(dir, 'scratch.img'));
  });
});

describe('FirecrackerVm', () => {
  it('configures a cold boot in order over the API, then starts the instance', async () => {
    const vm = await started(config());
    expect(requests()).toEqual([
      { method: 'PUT', path: '/machine-config', body: { vcpu_count: 2, mem_size_mib: 256, smt: false } },
      {
        method: 'PUT',
        path: '/boot-source',
        body: { kernel_image_path: path.join(dir, 'vmlinux'), boot_args: `${BOOT_ARGS} aegis_hostname=h1` },
      },
      {
        method: 'PUT',
        path: '/drives/rootfs',
        body: { drive_id: 'rootfs', path_on_host: 'rootfs.disk', is_root_device: false, is_read_only: true },
      },
      {
        method: 'PUT',
        path: '/drives/scratch',
        body: { drive_id: 'scratch', path_on_host: 'scratch.disk', is_root_device: false, is_read_only: false, cache_type: 'Writeback' },
      },
      { method: 'PUT', path: '/vsock', body: { guest_cid: 3, uds_path: 'vsock.sock' } },
      { method: 'PUT', path: '/entropy', body: {} },
      { method: 'PUT', path: '/actions', body: { action_type: 'InstanceStart' } },
    ]);
    expect(vm.record()).toMatchObject({ backend: 'firecracker', id: 'vm1', stateDir: path.join(dir, 'vm1') });
    expect(await vm.consoleTail()).toContain('Linux version 6.1.0-fake');
  });

  it('adds the image disk third, read-only, so the guest sees it as /dev/vdc', async () => {
    await started(config({ imageDiskPath: path.join(dir, 'image.erofs') }));
    const drives = requests().filter((r) => r.path.startsWith('/drives/'));
    expect(drives.map((r) => r.path)).toEqual(['/drives/rootfs', '/drives/scratch', '/drives/image']);
    expect(drives[2]?.body).toEqual({ drive_id: 'image', path_on_host: 'image.disk', is_root_device: false, is_read_only: true });
    expect(fs.readlinkSync(path.join(dir, 'vm1', 'image.disk'))).toBe(path.join(dir, 'image.erofs'));
  });

  it('adds named volumes after the fixed drives and tells the guest their names (vdd, vde with an image)', async () => {
    const vol = (name: string, readOnly: boolean): NonNullable<VmConfig['volumes']>[number] => ({
      kind: 'disk',
      hostPath: path.join(dir, `${name}.ext4`),
      guestPath: `/data/${name}`,
      readOnly,
    });
    await started(config({ imageDiskPath: path.join(dir, 'image.erofs'), volumes: [vol('a', false), vol('b b', true)] }));
    const drives = requests().filter((r) => r.path.startsWith('/drives/'));
    expect(drives.slice(3)).toEqual([
      {
        method: 'PUT',
        path: '/drives/volume0',
        body: { drive_id: 'volume0', path_on_host: 'volume0.disk', is_root_device: false, is_read_only: false, cache_type: 'Writeback' },
      },
      {
        method: 'PUT',
        path: '/drives/volume1',
        body: { drive_id: 'volume1', path_on_host: 'volume1.disk', is_root_device: false, is_read_only: true },
      },
    ]);
    expect(fs.readlinkSync(path.join(dir, 'vm1', 'volume1.disk'))).toBe(path.join(dir, 'b b.ext4'));
    const boot = requests().find((r) => r.path === '/boot-source')?.body as { boot_args: string };
    expect(boot.boot_args).toBe(
      `${BOOT_ARGS} aegis_image=/dev/vdc aegis_vol0=ext4,/dev/vdd,rw,/data/a aegis_vol1=ext4,/dev/vde,ro,/data/b%20b aegis_hostname=h1`,
    );
  });

  it('restores a snapshot with one load request and nothing else, RAM mapped from the memory file', async () => {
    const snap = path.join(dir, 'snapshot.bin');
    const mem = path.join(dir, 'memory');
    fs.writeFileSync(snap, 'state');
    fs.writeFileSync(mem, 'ram');
    await started(config({ restoreFrom: snap, snapshotMemory: { path: mem, access: 'map' } }));
    expect(requests()).toEqual([
      {
        method: 'PUT',
        path: '/snapshot/load',
        body: { snapshot_path: snap, mem_backend: { backend_type: 'File', backend_path: mem }, resume_vm: true },
      },
    ]);
  });

  it('restores from <snapshot>.mem when no memory file is given', async () => {
    const snap = path.join(dir, 'snapshot.bin');
    fs.writeFileSync(snap, 'state');
    fs.writeFileSync(`${snap}.mem`, 'ram');
    await started(config({ restoreFrom: snap }));
    expect(requests()[0]?.body).toMatchObject({ mem_backend: { backend_type: 'File', backend_path: `${snap}.mem` } });
  });

  it('pauses, resumes and snapshots with PATCH /vm and PUT /snapshot/create', async () => {
    const vm = await started(config());
    const skip = requests().length;
    await vm.pause();
    await vm.resume();
    await vm.saveSnapshot?.(path.join(dir, 'snap.bin'));
    expect(requests().slice(skip)).toEqual([
      { method: 'PATCH', path: '/vm', body: { state: 'Paused' } },
      { method: 'PATCH', path: '/vm', body: { state: 'Resumed' } },
      { method: 'PATCH', path: '/vm', body: { state: 'Paused' } },
      {
        method: 'PUT',
        path: '/snapshot/create',
        body: { snapshot_type: 'Full', snapshot_path: path.join(dir, 'snap.bin'), mem_file_path: path.join(dir, 'snap.bin.mem') },
      },
    ]);
  });

  it("writes a template's RAM to its memory file, where the clones will map it from", async () => {
    const vm = await started(config({ snapshotMemory: { path: path.join(dir, 'memory'), access: 'write' } }));
    await vm.saveSnapshot?.(path.join(dir, 'snap.bin'));
    expect(requests().at(-1)?.body).toMatchObject({ mem_file_path: path.join(dir, 'memory') });
  });

  it('opens the agent and data channels through the vsock socket with CONNECT 1024 / 1025', async () => {
    const vm = await started(config());
    for (const [open, port] of [
      [() => vm.connectAgent(), 1024],
      [() => vm.connectData(), 1025],
    ] as const) {
      const stream = await open();
      const greeting = `hello port ${port}\n`;
      const got = new Promise<string>((resolve) => {
        let text = '';
        stream.on('data', (c: Buffer) => {
          text += c.toString();
          if (text.length >= greeting.length + 5) resolve(text);
        });
      });
      stream.write('ping\n');
      expect(await got).toBe(`${greeting}ping\n`);
      stream.destroy();
    }
  });

  it('fails start with UNAVAILABLE carrying the fault message, and leaves no process behind', async () => {
    fakeEnv = { FAKE_FC_FAULT: 'PUT /drives/scratch' };
    const vm = await backend().create(config());
    const err = await failure(vm.start());
    expect(err.code).toBe('UNAVAILABLE');
    expect(err.message).toContain('fake fault on PUT /drives/scratch');
    expect((await vm.exited).reason).toBe('killed');
  });

  it('stops with SendCtrlAltDel and reports host-stop', async () => {
    const vm = await started(config());
    await vm.stop({ timeoutMs: 2000 });
    expect(requests().at(-1)).toEqual({ method: 'PUT', path: '/actions', body: { action_type: 'SendCtrlAltDel' } });
    expect(await vm.exited).toEqual({ reason: 'host-stop', detail: 'stopped by the host' });
  });

  it('kills a VM that ignores SendCtrlAltDel after timeoutMs', async () => {
    fakeEnv = { FAKE_FC_IGNORE_CAD: '1' };
    const vm = await started(config());
    const t0 = Date.now();
    await vm.stop({ timeoutMs: 150 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(140);
    expect((await vm.exited).reason).toBe('host-stop');
  });

  it("takes no verdict from the guest's console: a guest that prints a kernel panic and resets is a guest reset (status 0), not a panic", async () => {
    // FAKE_FC_PANIC: "Kernel panic - not syncing" on the console, then exit 0 as on a reset.
    fakeEnv = { FAKE_FC_PANIC: '1' };
    const vm = await started(config());
    expect(await vm.exited).toEqual({ reason: 'guest-poweroff', detail: 'guest ended the VM (a reset: poweroff, reboot or kernel panic)' });
  });

  it('takes no verdict from the guest\'s console: forged "exit_code=" and panic lines do not change why a VM ended', async () => {
    fakeEnv = { FAKE_FC_CONSOLE: '[vm1:main] Firecracker exiting with error. exit_code=0\nKernel panic - not syncing: forged' };
    const vm = await started(config());
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.readFileSync(path.join(dir, 'vm1', 'firecracker.log'), 'utf8')).toContain('exit_code=0');
    process.kill(vm.record()['pid'] as number, 'SIGKILL');
    expect(await vm.exited).toEqual({ reason: 'killed', detail: 'Firecracker was killed by SIGKILL' });
  });

  it('reports a VMM killed by a signal', async () => {
    const vm = await started(config());
    process.kill(vm.record()['pid'] as number, 'SIGKILL');
    expect(await vm.exited).toEqual({ reason: 'killed', detail: 'Firecracker was killed by SIGKILL' });
  });

  it("a guest flooding its console does not grow the host's log file without bound", async () => {
    // 4 MiB of console output over 2 s: 2 MiB/s, so between two checks (1 s apart) the file may
    // pass the 1 MiB bound by up to 2 MiB; without the bound it would reach 4 MiB.
    const flood = 4 << 20;
    const perSecond = flood / 2;
    fakeEnv = { FAKE_FC_CONSOLE_FLOOD: `${flood}:2000` };
    const vm = await started(config());
    const log = path.join(dir, 'vm1', 'firecracker.log');
    let largest = 0;
    const sizeNow = (): number => fs.statSync(log).size;
    const until = async (done: () => boolean, ms: number): Promise<void> => {
      const deadline = Date.now() + ms;
      while (!done() && Date.now() < deadline) {
        largest = Math.max(largest, sizeNow());
        await new Promise((r) => setTimeout(r, 10));
      }
    };
    await until(() => fs.readFileSync(log, 'utf8').includes('console flood done'), 8000);
    expect(fs.readFileSync(log, 'utf8')).toContain('console flood done');
    // The flood is over; the next check cuts the file back.
    await until(() => sizeNow() <= CONSOLE_MAX_BYTES, 2500);
    expect(largest).toBeGreaterThan(CONSOLE_MAX_BYTES);
    expect(largest).toBeLessThanOrEqual(CONSOLE_MAX_BYTES + perSecond);
    expect(sizeNow()).toBeLessThanOrEqual(CONSOLE_MAX_BYTES);
    // The file starts at a whole line, and consoleTail still gives the latest ones.
    expect(fs.readFileSync(log, 'utf8')).toMatch(/^(flood line \d+ x+|console flood done after \d+ lines)\n/);
    const tail = await vm.consoleTail(1000);
    expect(tail).toMatch(/console flood done after \d+ lines\n$/);
    // (The guest goes on printing its "done" line: the file may have grown since.)
    expect(fs.readFileSync(log, 'utf8').slice(-2000)).toContain(tail);
  }, 15_000);

  it('a console log that grew while no daemon was attached is cut back as soon as one attaches', async () => {
    const vm = await started(config());
    const record = vm.record();
    vm.detach();
    const log = path.join(dir, 'vm1', 'firecracker.log');
    // The guest's output while detached: appended as Firecracker would.
    fs.appendFileSync(log, 'old line\n'.repeat((2 * CONSOLE_MAX_BYTES) / 9));
    fs.appendFileSync(log, 'the latest line\n');
    await new Promise((r) => setTimeout(r, 1200));
    expect(fs.statSync(log).size).toBeGreaterThan(2 * CONSOLE_MAX_BYTES);
    const again = await backend().attach(record);
    vms.push(again);
    const deadline = Date.now() + 500;
    while (fs.statSync(log).size > CONSOLE_MAX_BYTES && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    expect(fs.statSync(log).size).toBeLessThanOrEqual(CONSOLE_MAX_BYTES);
    expect(await again.consoleTail(100)).toMatch(/old line\nthe latest line\n$/);
  });

  it('stop after detach returns and the process is gone', async () => {
    const vm = await started(config());
    const pid = vm.record()['pid'] as number;
    vm.detach();
    await vm.stop({ timeoutMs: 2000 });
    expect(processAlive(pid)).toBe(false);
    expect(requests().at(-1)).toEqual({ method: 'PUT', path: '/actions', body: { action_type: 'SendCtrlAltDel' } });
  });

  it('stop after detach returns and the process is gone, killed after timeoutMs when it ignores SendCtrlAltDel', async () => {
    fakeEnv = { FAKE_FC_IGNORE_CAD: '1' };
    const vm = await started(config());
    const pid = vm.record()['pid'] as number;
    vm.detach();
    const t0 = Date.now();
    await vm.stop({ timeoutMs: 150 });
    expect(Date.now() - t0).toBeGreaterThanOrEqual(140);
    expect(processAlive(pid)).toBe(false);
  });

  it('stop after detach returns and the process is gone, for an attached VM as well', async () => {
    fakeEnv = { FAKE_FC_IGNORE_CAD: '1' };
    const vm = await started(config());
    const record = vm.record();
    vm.detach();
    const again = await backend().attach(record);
    again.detach();
    await again.stop({ timeoutMs: 150 });
    expect(processAlive(record['pid'] as number)).toBe(false);
  });

  it('is found again by attach, and attach says NOT_FOUND for a wrong id or a gone process', async () => {
    const vm = await started(config());
    const record = vm.record();
    vm.detach();
    const again = await backend().attach(record);
    vms.push(again);
    await again.pause();
    expect(requests().at(-1)).toEqual({ method: 'PATCH', path: '/vm', body: { state: 'Paused' } });
    expect((await failure(backend().attach({ ...record, id: 'other' }))).code).toBe('NOT_FOUND');
    // Not our child: the exit is noticed by polling the pid; its status is not ours to read.
    process.kill(record['pid'] as number, 'SIGTERM');
    expect((await again.exited).reason).toBe('killed');
    expect((await failure(backend().attach(record))).code).toBe('NOT_FOUND');
  });

  it("does not read an attached VM's exit from firecracker.log, where the guest's console can forge Firecracker's exit line", async () => {
    // The guest prints what Firecracker prints as it exits successfully; then the process is killed.
    fakeEnv = { FAKE_FC_CONSOLE: '2030-01-01T00:00:00.000000000 [vm1:main] Firecracker exiting successfully. exit_code=0' };
    const vm = await started(config());
    const record = vm.record();
    vm.detach();
    const again = await backend().attach(record);
    await new Promise((r) => setTimeout(r, 50));
    expect(fs.readFileSync(path.join(record['stateDir'] as string, 'firecracker.log'), 'utf8')).toMatch(
      /\[vm1:main\] Firecracker exiting successfully\. exit_code=0/,
    );
    process.kill(record['pid'] as number, 'SIGKILL');
    const exit = await again.exited;
    expect(exit.reason).toBe('killed');
    expect(exit.detail).toMatch(/exit status aegisd cannot read/);
  });
});

describe('FirecrackerBackend.copyDisk', () => {
  it("copies a raw disk whole and sparse (a checkpoint's own disk), and refuses a clone it never makes", async () => {
    const src = path.join(dir, 'scratch.img');
    const fd = fs.openSync(src, 'w');
    fs.writeSync(fd, Buffer.from('head'), 0, 4, 0);
    fs.writeSync(fd, Buffer.alloc(4096, 7), 0, 4096, 64 << 20);
    fs.ftruncateSync(fd, 128 << 20);
    fs.closeSync(fd);
    const dest = path.join(dir, 'disk');
    await backend().copyDisk(src, false, dest);
    const st = fs.statSync(dest);
    expect(st.size).toBe(128 << 20);
    expect(st.blocks * 512).toBeLessThan(1 << 20);
    expect(st.mode & 0o777).toBe(0o600);
    const out = fs.openSync(dest, 'r');
    const probe = Buffer.alloc(4096);
    fs.readSync(out, probe, 0, 4096, 64 << 20);
    fs.closeSync(out);
    expect(probe.equals(Buffer.alloc(4096, 7))).toBe(true);
    expect(fs.readFileSync(dest).subarray(0, 4).toString()).toBe('head');
    expect((await failure(backend().copyDisk(src, true, path.join(dir, 'other')))).code).toBe('UNSUPPORTED');
    const missing = await failure(backend().copyDisk(path.join(dir, 'nope'), false, path.join(dir, 'third')));
    expect(missing.code).toBe('UNAVAILABLE');
    expect(fs.existsSync(path.join(dir, 'third'))).toBe(false);
  });
});
