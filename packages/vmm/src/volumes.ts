/**
 * How a backend tells aegis-init where to mount volumes: one `aegis_volN=FSTYPE,SOURCE,MODE,PATH`
 * word per volume on the kernel command line (the kernel hands `name=value` words it does not
 * know to init as environment variables; `aegis_net=` travels the same way). FSTYPE is what the
 * guest mounts (`ext4` for a disk, `9p` for a share), SOURCE the block device (`/dev/vdd`) or
 * the share's tag, MODE `ro` or `rw`, and PATH the guest path percent-encoded: a command-line
 * word cannot hold a space, and commas separate the fields.
 */
import { AegisError } from '@aegis/protocol';

export type GuestFsType = 'ext4' | '9p';

/** Characters a guest path keeps as they are; everything else becomes %XX (UTF-8 bytes). */
const PLAIN = /^[A-Za-z0-9/._+-]$/;

export function encodeGuestPath(guestPath: string): string {
  let out = '';
  for (const byte of Buffer.from(guestPath, 'utf8')) {
    const c = String.fromCharCode(byte);
    out += byte < 0x80 && PLAIN.test(c) ? c : `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

/** The inverse of `encodeGuestPath` (aegis-init does the same in C). */
export function decodeGuestPath(encoded: string): string {
  return Buffer.from(
    encoded.replace(/%([0-9A-F]{2})/g, (_m, h: string) => String.fromCharCode(parseInt(h, 16))),
    'latin1',
  ).toString('utf8');
}

export function volumeKernelArg(index: number, fsType: GuestFsType, source: string, readOnly: boolean, guestPath: string): string {
  if (!/^[A-Za-z0-9/._-]+$/.test(source))
    throw new AegisError('INTERNAL', `volume source ${JSON.stringify(source)} cannot go on the kernel command line`);
  return `aegis_vol${index}=${fsType},${source},${readOnly ? 'ro' : 'rw'},${encodeGuestPath(guestPath)}`;
}

/** The guest's name for the n-th virtio block device, in the order they are attached (0: vda). */
export function virtioDiskName(index: number): string {
  if (!Number.isInteger(index) || index < 0 || index >= 26)
    throw new AegisError('INVALID_ARGUMENT', `no virtio disk name for device #${index}`);
  return `/dev/vd${String.fromCharCode(0x61 + index)}`;
}

/**
 * The x86 kernel keeps 2048 bytes of command line (COMMAND_LINE_SIZE) and silently cuts the
 * rest: a volume whose word was cut would not be mounted. Backends check before booting.
 */
export const KERNEL_CMDLINE_MAX_BYTES = 2048;
