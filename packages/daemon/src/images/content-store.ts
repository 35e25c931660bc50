/**
 * Contents of regular files as they stream out of the layers, kept apart from the tree so that
 * reading a layer never waits on the disk and a file a later layer deletes costs one unlink.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';

// Contents up to this size are buffered and written in the background, so thousands of small
// files do not each cost a round trip through the thread pool before the next entry is read.
const SMALL_FILE_BYTES = 1 << 20;
export const MAX_PENDING_WRITES = 64;
const MAX_PENDING_BYTES = 64 << 20;

/** Contents of regular files, one file per id, written as they stream out of the layers. */
export class ContentStore {
  private next = 0;
  private readonly pending = new Map<number, Promise<void>>();
  private pendingBytes = 0;
  private failure: unknown;

  constructor(readonly dir: string) {}

  pathOf(id: number): string {
    return path.join(this.dir, String(id));
  }

  async add(entry: AsyncIterable<unknown>, size: number): Promise<number> {
    this.check();
    const id = this.next++;
    const file = this.pathOf(id);
    if (size > SMALL_FILE_BYTES) {
      const fh = await fs.open(file, 'wx', 0o600);
      try {
        for await (const chunk of entry) await fh.write(chunk as Uint8Array);
      } finally {
        await fh.close();
      }
      return id;
    }
    const chunks: Uint8Array[] = [];
    for await (const chunk of entry) chunks.push(chunk as Uint8Array);
    const data = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
    this.track(id, fs.writeFile(file, data, { flag: 'wx', mode: 0o600 }), data.length);
    while (this.pending.size >= MAX_PENDING_WRITES || this.pendingBytes >= MAX_PENDING_BYTES) {
      await Promise.race(this.pending.values());
    }
    return id;
  }

  /** Deletes a content a later layer made unreachable, once its write has finished. */
  discard(id: number): void {
    const written = this.pending.get(id) ?? Promise.resolve();
    this.track(
      id,
      written.then(() => fs.unlink(this.pathOf(id))),
      0,
    );
  }

  /** Waits for every write, ignoring failures: for cleaning up after one. */
  async settle(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled(this.pending.values());
  }

  async flush(): Promise<void> {
    while (this.pending.size > 0) await Promise.all(this.pending.values());
    this.check();
  }

  private track(id: number, work: Promise<void>, bytes: number): void {
    this.pendingBytes += bytes;
    const done: Promise<void> = work
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => {
        this.pendingBytes -= bytes;
        if (this.pending.get(id) === done) this.pending.delete(id);
      });
    this.pending.set(id, done);
  }

  private check(): void {
    if (this.failure !== undefined) throw this.failure;
  }
}
