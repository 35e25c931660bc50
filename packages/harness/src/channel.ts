/**
 * The guest end of the agent channel: a virtio-serial character device.
 *
 * Its quirks (shared notes) shape this code: while the host end is disconnected, reads return
 * EOF again and again (so we poll), and writes block (so they run on libuv's thread pool via
 * fs promises, one at a time, never on the main thread). Data written during a disconnect is
 * delivered when the host reconnects, so nothing here needs to know about reconnects.
 */
import { open, type FileHandle } from 'node:fs/promises';

const EOF_POLL_MS = 20;

export class Channel {
  private queue: Buffer[] = [];
  private writing: Promise<void> | undefined;

  private constructor(private readonly fh: FileHandle) {}

  static async open(path: string): Promise<Channel> {
    return new Channel(await open(path, 'r+'));
  }

  /** Reads forever, handing each chunk to `onData` (the buffer is reused after it returns). */
  async readLoop(onData: (chunk: Buffer) => void): Promise<never> {
    const buf = Buffer.alloc(64 * 1024);
    for (;;) {
      let n = 0;
      try {
        n = (await this.fh.read(buf, 0, buf.length, null)).bytesRead;
      } catch {
        n = 0;
      }
      if (n === 0) {
        await new Promise((r) => setTimeout(r, EOF_POLL_MS));
        continue;
      }
      onData(buf.subarray(0, n));
    }
  }

  write(line: string): void {
    this.queue.push(Buffer.from(line, 'utf8'));
    this.writing ??= this.flushQueue();
  }

  /** Resolves when everything written so far has reached the host side. */
  async drain(): Promise<void> {
    while (this.writing) await this.writing;
  }

  private async flushQueue(): Promise<void> {
    try {
      while (this.queue.length > 0) {
        // Coalesce queued lines into one write: fewer syscalls and thread-pool hops.
        const data = Buffer.concat(this.queue.splice(0));
        let off = 0;
        while (off < data.length) {
          off += (await this.fh.write(data, off, data.length - off, null)).bytesWritten;
        }
      }
    } finally {
      this.writing = undefined;
    }
  }
}
