import { createHash } from 'node:crypto';
import { promises as fs, readFileSync } from 'node:fs';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { AegisError } from '@aegis/protocol';

/** The last `maxBytes` of a file (a VMM's console or log), or '' when it cannot be read. */
export async function fileTail(file: string, maxBytes: number): Promise<string> {
  try {
    const fh = await fs.open(file, 'r');
    try {
      const { size } = await fh.stat();
      const len = Math.min(size, maxBytes);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, size - len);
      return buf.toString('utf8');
    } finally {
      await fh.close();
    }
  } catch {
    return '';
  }
}

/** Is `pid` alive? (EPERM: it is, but someone else's.) For VMM processes we did not spawn. */
/**
 * This host's CPU as a guest given the host CPU (`-cpu host`, Firecracker without a template)
 * sees it: a digest of the first processor's model and feature flags in /proc/cpuinfo. Two
 * hosts that differ in one flag differ here.
 */
export function hostCpuFingerprint(cpuinfo = readCpuinfo()): string {
  const first = cpuinfo.split(/\n\s*\n/)[0] ?? '';
  const keep = first
    .split('\n')
    .filter((l) =>
      /^(vendor_id|cpu family|model|model name|flags|Features|CPU implementer|CPU architecture|CPU variant|CPU part)\s*:/.test(l),
    )
    .map((l) => l.replace(/\s+/g, ' ').trim());
  return `host:${createHash('sha256').update(keep.join('\n')).digest('hex').slice(0, 16)}`;
}

function readCpuinfo(): string {
  try {
    return readFileSync('/proc/cpuinfo', 'utf8');
  } catch {
    return '';
  }
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Connects to a VM channel's unix socket (`what`: agent, data); CANCELLED when `signal`
 * aborts first, UNAVAILABLE naming the VM when nothing answers there.
 */
export function connectSocket(socketPath: string, what: string, vmId: string, signal?: AbortSignal): Promise<Duplex> {
  return new Promise((resolve, reject) => {
    const s = net.connect(socketPath);
    const onAbort = (): void => {
      s.destroy();
      reject(new AegisError('CANCELLED', `${what} channel connect cancelled`));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    s.once('connect', () => {
      signal?.removeEventListener('abort', onAbort);
      resolve(s);
    });
    s.once('error', (err) => {
      signal?.removeEventListener('abort', onAbort);
      reject(new AegisError('UNAVAILABLE', `${what} channel of VM ${vmId}: ${err.message}`));
    });
  });
}
