import { describe, expect, it } from 'vitest';
import { isAegisError, LINK_MTU } from '@aegis/protocol';
import type { VmConfig } from '@aegis/vmm';
import { DATA_LINK_MAC, qemuArgs, TCG_CPU } from './args.js';

const base: VmConfig = {
  id: '0123456789abcdef',
  stateDir: '/tmp/aegis-test/vm',
  kernelPath: '/k/vmlinux',
  rootfsPath: '/k/base.erofs',
  scratchDiskPath: '/i/scratch.img',
  memoryMiB: 512,
  vcpuCount: 1,
  network: 'none',
  kernelArgs: [],
};

/** The values of every `-device` and `-fsdev`/`-drive` in order, and the kernel's command line. */
async function shape(config: VmConfig): Promise<{ devices: string[]; append: string; all: string[] }> {
  const args = await qemuArgs(config, false);
  const devices = args.flatMap((a, i) => (args[i - 1] === '-device' ? [a] : []));
  return { devices, append: args[args.indexOf('-append') + 1] ?? '', all: args };
}

describe('QEMU volumes', () => {
  it('attaches a host directory as 9p (mapped-xattr) and a named volume as a disk, and tells the guest where to mount them', async () => {
    const { devices, append, all } = await shape({
      ...base,
      imageDiskPath: '/img/fs.ext4',
      volumes: [
        { kind: 'share', hostPath: '/home/me/src', guestPath: '/src', readOnly: true },
        { kind: 'disk', hostPath: '/h/volumes/cache.ext4', guestPath: '/root/.cache', readOnly: false },
      ],
    });
    // Shares first (the fifth slot's IRQ is the RTC's, which 9p cannot share), then root, scratch, image, volumes.
    expect(devices.slice(0, 5)).toEqual([
      'virtio-9p-device,fsdev=aegis0,mount_tag=aegis0',
      'virtio-blk-device,drive=root',
      'virtio-blk-device,drive=scratch',
      'virtio-blk-device,drive=image',
      'virtio-blk-device,drive=aegis1',
    ]);
    expect(all).toContain(
      'local,id=aegis0,path=/home/me/src,security_model=mapped-xattr,multidevs=remap,fmode=0644,dmode=0755,readonly=on',
    );
    expect(all).toContain('id=aegis1,file=/h/volumes/cache.ext4,format=raw,if=none,discard=unmap');
    expect(append).toContain('aegis_image=/dev/vdc aegis_vol0=9p,aegis0,ro,/src aegis_vol1=ext4,/dev/vdd,rw,/root/.cache');
  });

  it('names the first volume disk vdc without an image, and doubles commas in host paths', async () => {
    const { append, all } = await shape({
      ...base,
      volumes: [
        { kind: 'disk', hostPath: '/h/a,b.ext4', guestPath: '/a', readOnly: true },
        { kind: 'share', hostPath: '/h/x,y', guestPath: '/x', readOnly: false },
      ],
    });
    expect(append).toContain('aegis_vol0=ext4,/dev/vdc,ro,/a');
    expect(all).toContain('id=aegis0,file=/h/a,,b.ext4,format=raw,if=none,discard=unmap,readonly=on');
    expect(all.some((a) => a.startsWith('local,id=aegis1,path=/h/x,,y,'))).toBe(true);
  });

  it('refuses more volumes than microvm has device slots, saying how many fit', async () => {
    if (process.arch !== 'x64') return;
    const v = (i: number): NonNullable<VmConfig['volumes']>[number] => ({
      kind: 'disk',
      hostPath: `/v${i}`,
      guestPath: `/v${i}`,
      readOnly: false,
    });
    await expect(shape({ ...base, volumes: [v(1), v(2), v(3), v(4)] })).resolves.toBeDefined();
    const err = await shape({ ...base, network: 'user', imageDiskPath: '/i', volumes: [v(1), v(2), v(3)] }).catch((e: unknown) => e);
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect((err as Error).message).toMatch(/at most 2 volumes/);
  });

  it('refuses volumes on a machine restored from a snapshot, and paths that overflow the command line', async () => {
    const restore = shape({
      ...base,
      restoreFrom: '/t/state',
      volumes: [{ kind: 'disk', hostPath: '/v', guestPath: '/v', readOnly: false }],
    });
    expect(isAegisError(await restore.catch((e: unknown) => e), 'UNSUPPORTED')).toBe(true);
    const long = `/${'x'.repeat(700)}`;
    const volumes = [1, 2, 3].map((i) => ({ kind: 'disk' as const, hostPath: `/v${i}`, guestPath: `${long}${i}`, readOnly: false }));
    const err = await shape({ ...base, volumes }).catch((e: unknown) => e);
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect((err as Error).message).toMatch(/command line too long/);
  });

  it('a data link is a virtio-net device with a 64 KiB MTU on a stream socket QEMU listens on, named to the guest, and takes a slot', async () => {
    const { devices, append, all } = await shape({ ...base, dataLink: true });
    expect(devices).toContain(`virtio-net-device,netdev=datalink,mac=${DATA_LINK_MAC},host_mtu=${LINK_MTU}`);
    expect(all).toContain('stream,id=datalink,server=on,addr.type=unix,addr.path=/tmp/aegis-test/vm/data-link.sock');
    expect(append.split(' ')).toContain(`aegis_datalink=${DATA_LINK_MAC}`);
    expect(all.join(' ')).toContain(`-cpu ${TCG_CPU}`);
    expect((await shape(base)).append).not.toMatch(/aegis_datalink/);
    if (process.arch !== 'x64') return;
    const v = (i: number): NonNullable<VmConfig['volumes']>[number] => ({
      kind: 'disk',
      hostPath: `/v${i}`,
      guestPath: `/v${i}`,
      readOnly: false,
    });
    const err = await shape({ ...base, dataLink: true, volumes: [v(1), v(2), v(3), v(4)] }).catch((e: unknown) => e);
    expect((err as Error).message).toMatch(/at most 3 volumes.*the data link/);
  });
});
