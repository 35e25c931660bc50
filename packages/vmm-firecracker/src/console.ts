/**
 * Keeping firecracker.log (Firecracker's stdout: the guest's serial console) bounded, since
 * Firecracker has no console ring of its own.
 */
import { constants as fsc, promises as fs } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';

/**
 * The bound on firecracker.log while a daemon is attached. It is Firecracker's stdout, and so
 * the guest's serial console: a guest printing to /dev/console grows it at whatever rate it
 * likes (QEMU's console measured 0.5-0.7 MB/s, ~2 GB an hour, before it got a ring). Past
 * CONSOLE_MAX_BYTES, checked every CONSOLE_CHECK_MS, the file is cut back to its last
 * CONSOLE_KEEP_BYTES (`trimConsoleLog`), as the QEMU backend keeps its console in a 1 MiB ring.
 */
export const CONSOLE_MAX_BYTES = 1 << 20;
export const CONSOLE_KEEP_BYTES = 256 << 10;
export const CONSOLE_CHECK_MS = 1000;

/**
 * Cuts a console log longer than `maxBytes` back to its last `keepBytes` (from the first whole
 * line in them): reads the tail, truncates the file to 0 and writes the tail back. Returns
 * whether it cut. Safe only because Firecracker's stdout is this file opened O_APPEND (`start`
 * opens it with 'a', as every aegisd has): its next write lands at the new end, not at its old
 * offset past a hole. We write the tail back through O_APPEND too, so whatever Firecracker wrote
 * since the truncation stays (just before the tail, out of order) instead of being overwritten.
 * Bytes written between our last read and the truncation, microseconds, are lost: it is a
 * console, kept for error reports. A file that is missing or unreadable is left alone.
 */
export async function trimConsoleLog(file: string, maxBytes = CONSOLE_MAX_BYTES, keepBytes = CONSOLE_KEEP_BYTES): Promise<boolean> {
  let fh: FileHandle;
  try {
    // No O_CREAT: a log that has gone (its state directory removed) is not made again.
    fh = await fs.open(file, fsc.O_RDWR | fsc.O_APPEND);
  } catch {
    return false;
  }
  try {
    const { size } = await fh.stat();
    if (size <= maxBytes) return false;
    // From keepBytes before the end to the end as it is now: the guest may still be writing.
    const chunks: Buffer[] = [];
    let pos = size - keepBytes;
    let total = 0;
    while (total < maxBytes) {
      const buf = Buffer.alloc(64 << 10);
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      chunks.push(buf.subarray(0, bytesRead));
      pos += bytesRead;
      total += bytesRead;
    }
    await fh.truncate(0);
    let tail = Buffer.concat(chunks);
    // Start at a whole line (and so not inside a UTF-8 sequence) when there is one.
    const nl = tail.indexOf(0x0a);
    if (nl >= 0 && nl < tail.length - 1) tail = tail.subarray(nl + 1);
    await fh.write(tail);
    return true;
  } catch {
    return false;
  } finally {
    await fh.close().catch(() => undefined);
  }
}
