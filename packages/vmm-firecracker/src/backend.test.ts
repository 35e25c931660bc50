/**
 * The backend against a stand-in `firecracker` (test/fake-firecracker.mjs, a node script that
 * serves the API on --api-sock and records every request): there is no KVM here, so these tests
 * check what we send and how we react, not that a guest boots.
 */
import { spawn, type SpawnOptions } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError } from '@aegis/protocol';
import type { Vm, VmConfig } from '@aegis/vmm';
import { FirecrackerApi } from './api.js';
import { FirecrackerBackend } from './backend.js';

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
      if (!fs.existsSync('/dev/kvm')) expect(probe.detail).toContain('/dev/kvm missing: Firecracker needs KVM');
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
});

describe('FirecrackerBackend.create', () => {
  it("refuses network 'user' with UNSUPPORTED and says what to do", async () => {
    const err = await failure(backend().create(config({ network: 'user' })));
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toContain('--network none');
  });

  it('refuses a qcow2 scratch disk with UNSUPPORTED: Firecracker takes raw images only', async () => {
    const err = await failure(backend().create(config({ scratchDiskFormat: 'qcow2' })));
    expect(err.code).toBe('UNSUPPORTED');
    expect(err.message).toContain('raw disk images only');
  });

  it('refuses an id Firecracker would refuse, a shared memory file on restore, and a missing snapshot', async () => {
    expect((await failure(backend().create(config({ id: 'bad_id' })))).code).toBe('INVALID_ARGUMENT');
    const snap = path.join(dir, 'snap.bin');
    fs.writeFileSync(snap, 'x');
    const shared = config({ restoreFrom: snap, memoryFile: { path: path.join(dir, 'mem'), shared: true } });
    expect((await failure(backend().create(shared))).code).toBe('UNSUPPORTED');
    expect((await failure(backend().create(config({ restoreFrom: snap })))).code).toBe('NOT_FOUND'); // no snap.bin.mem
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

  it('restores a snapshot with one load request and nothing else, RAM mapped from the memory file', async () => {
    const snap = path.join(dir, 'snapshot.bin');
    const mem = path.join(dir, 'memory');
    fs.writeFileSync(snap, 'state');
    fs.writeFileSync(mem, 'ram');
    await started(config({ restoreFrom: snap, memoryFile: { path: mem, shared: false } }));
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
    await vm.saveSnapshot(path.join(dir, 'snap.bin'));
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

  it("writes a template's RAM to its shared memory file, where the clones will map it from", async () => {
    const vm = await started(config({ memoryFile: { path: path.join(dir, 'memory'), shared: true } }));
    await vm.saveSnapshot(path.join(dir, 'snap.bin'));
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

  it('reports a guest panic (Firecracker exits 0 on the reset that follows it)', async () => {
    fakeEnv = { FAKE_FC_PANIC: '1' };
    const vm = await started(config());
    expect((await vm.exited).reason).toBe('guest-panic');
  });

  it('reports a VMM killed by a signal', async () => {
    const vm = await started(config());
    process.kill(vm.record()['pid'] as number, 'SIGKILL');
    expect(await vm.exited).toEqual({ reason: 'killed', detail: 'Firecracker was killed by SIGKILL' });
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
    // Not our child: the exit is noticed by polling the pid, and read from Firecracker's log.
    process.kill(record['pid'] as number, 'SIGTERM');
    expect((await again.exited).reason).toBe('killed');
    expect((await failure(backend().attach(record))).code).toBe('NOT_FOUND');
  });

  it('reads the exit status of an attached VM from the exit line Firecracker logs', async () => {
    const vm = await started(config());
    const record = vm.record();
    vm.detach();
    const again = await backend().attach(record);
    await again.resume();
    // SendCtrlAltDel makes the fake log "exiting successfully. exit_code=0" and exit 0, as a guest reset does.
    await new FirecrackerApi(path.join(record['stateDir'] as string, 'fc.sock')).put('/actions', { action_type: 'SendCtrlAltDel' });
    expect(await again.exited).toEqual({ reason: 'guest-poweroff', detail: 'guest ended the VM (reset)' });
  });
});
