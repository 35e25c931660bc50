import { promises as fs } from 'node:fs';

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
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
