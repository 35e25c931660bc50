import { createHash, randomBytes, type Hash } from 'node:crypto';
import { createReadStream, promises as fs } from 'node:fs';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { AegisError, isAegisError } from '@aegis/protocol';
import { validateDigest } from './reference.js';

/** Called as bytes land on disk; `totalBytes` is unknown when the source did not say. */
export type BlobProgress = (doneBytes: number, totalBytes: number | undefined) => void;

/** Opens the blob's content starting at `offset`; the stream must begin exactly there. */
export type BlobOpener = (offset: number) => Promise<Readable>;

/**
 * Content-addressed blob storage: `<root>/sha256/<hex>` holds only bytes that hashed to `<hex>`.
 * Downloads land in `<root>/partial/<hex>` and are renamed into place once verified, so a reader
 * never sees a half-written or unverified blob, and an interrupted download can resume.
 */
export class BlobStore {
  private readonly inflight = new Map<string, Promise<string>>();

  constructor(readonly root: string) {}

  path(digest: string): string {
    return path.join(this.root, 'sha256', hexOf(digest));
  }

  async has(digest: string): Promise<boolean> {
    try {
      return (await fs.stat(this.path(digest))).isFile();
    } catch {
      return false;
    }
  }

  /** Reads a small blob whole, refusing anything over `maxBytes` so a hostile blob cannot exhaust memory. */
  async read(digest: string, maxBytes: number): Promise<Buffer> {
    const file = this.path(digest);
    let size: number;
    try {
      size = (await fs.stat(file)).size;
    } catch {
      throw new AegisError('NOT_FOUND', `blob ${digest} is not in the store`);
    }
    if (size > maxBytes)
      throw new AegisError('RESOURCE_EXHAUSTED', `blob ${digest} is ${size} bytes; at most ${maxBytes} are allowed here`);
    return fs.readFile(file);
  }

  /**
   * Makes the blob present, fetching it with `open` only if it is not already stored. A partial
   * download left by an earlier attempt is resumed from where it stopped. Concurrent calls for one
   * digest share a single download. Returns the blob's path.
   */
  async ingest(
    digest: string,
    size: number | undefined,
    open: BlobOpener,
    onProgress?: BlobProgress,
    signal?: AbortSignal,
  ): Promise<string> {
    validateDigest(digest);
    if (size !== undefined && (!Number.isSafeInteger(size) || size < 0)) {
      throw new AegisError('INVALID_ARGUMENT', `blob ${digest} has an invalid size ${size}`);
    }
    for (;;) {
      signal?.throwIfAborted();
      const running = this.inflight.get(digest);
      if (running) {
        try {
          return await running;
        } catch (err) {
          // Someone else's cancellation is not ours: take over the download (and its partial file).
          if (isAegisError(err, 'CANCELLED') && !signal?.aborted) continue;
          throw err;
        }
      }
      const job = this.download(digest, size, open, onProgress, signal, true);
      this.inflight.set(digest, job);
      try {
        return await job;
      } finally {
        this.inflight.delete(digest);
      }
    }
  }

  /** Stores a blob from a one-shot stream (e.g. a tar entry), verifying it; no resume is possible. */
  async ingestStream(digest: string, size: number | undefined, stream: Readable): Promise<string> {
    validateDigest(digest);
    const running = this.inflight.get(digest);
    if (running || (await this.has(digest))) {
      stream.resume();
      return running ?? this.path(digest);
    }
    let used = false;
    const open: BlobOpener = async (offset) => {
      if (used || offset !== 0) throw new AegisError('INTERNAL', 'a one-shot stream cannot be reopened');
      used = true;
      return stream;
    };
    const job = this.download(digest, size, open, undefined, undefined, false);
    this.inflight.set(digest, job);
    try {
      return await job;
    } finally {
      this.inflight.delete(digest);
    }
  }

  async ingestFile(digest: string, file: string): Promise<string> {
    const { size } = await fs.stat(file);
    return this.ingestStream(digest, size, createReadStream(file));
  }

  /** Stores bytes already in memory (a manifest, a config) under their digest. */
  async put(digest: string, bytes: Buffer): Promise<string> {
    const actual = sha256Digest(bytes);
    if (actual !== digest) throw new AegisError('INVALID_ARGUMENT', `content does not match digest ${digest} (got ${actual})`);
    if (await this.has(digest)) return this.path(digest);
    const tmp = path.join(this.root, 'partial', `${hexOf(digest)}.${randomBytes(6).toString('hex')}`);
    await fs.mkdir(path.dirname(tmp), { recursive: true });
    const fh = await fs.open(tmp, 'w', 0o644);
    try {
      await fh.writeFile(bytes);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await this.commit(tmp, digest);
    return this.path(digest);
  }

  private async download(
    digest: string,
    size: number | undefined,
    open: BlobOpener,
    onProgress: BlobProgress | undefined,
    signal: AbortSignal | undefined,
    resume: boolean,
  ): Promise<string> {
    const final = this.path(digest);
    try {
      const st = await fs.stat(final);
      if (size === undefined || st.size === size) return final;
      // A stored blob of the wrong size was damaged after it was verified; fetch it again.
      await fs.rm(final, { force: true });
    } catch {
      // not stored yet
    }

    const partial = path.join(this.root, 'partial', hexOf(digest));
    await fs.mkdir(path.dirname(partial), { recursive: true });
    const hash = createHash('sha256');
    let offset = 0;
    if (resume) {
      offset = await hashExisting(partial, hash, size);
    }
    if (offset === 0) await fs.rm(partial, { force: true });

    const fh = await fs.open(partial, offset === 0 ? 'w' : 'a', 0o644);
    let done = offset;
    let closed = false;
    try {
      if (size === undefined || done < size) {
        onProgress?.(done, size);
        const stream = await open(offset);
        try {
          for await (const chunk of stream as AsyncIterable<Buffer>) {
            if (size !== undefined && done + chunk.length > size) {
              throw new AegisError('INVALID_ARGUMENT', `blob ${digest} is longer than the ${size} bytes its descriptor declares`);
            }
            hash.update(chunk);
            await fh.write(chunk);
            done += chunk.length;
            onProgress?.(done, size);
          }
        } catch (err) {
          stream.destroy();
          if (isAegisError(err)) throw err;
          if (signal?.aborted || (err as Error).name === 'AbortError') {
            throw new AegisError('CANCELLED', `download of ${digest} was cancelled; it will resume from byte ${done}`, { cause: err });
          }
          throw new AegisError('UNAVAILABLE', `download of ${digest} failed after ${done} bytes: ${(err as Error).message}`, {
            cause: err,
          });
        }
        if (size !== undefined && done < size) {
          throw new AegisError('UNAVAILABLE', `download of ${digest} ended after ${done} of ${size} bytes; retry to resume`);
        }
      }
      const actual = `sha256:${hash.digest('hex')}`;
      if (actual !== digest) {
        await fh.close();
        closed = true;
        await fs.rm(partial, { force: true });
        throw new AegisError('INVALID_ARGUMENT', `content of blob ${digest} does not match its digest (got ${actual}); it was discarded`);
      }
      await fh.sync();
      await fh.close();
      closed = true;
      await this.commit(partial, digest);
      return final;
    } catch (err) {
      // A blob longer than declared can never become valid, so its partial is worthless.
      if (isAegisError(err, 'INVALID_ARGUMENT')) await fs.rm(partial, { force: true });
      throw err;
    } finally {
      if (!closed) await fh.close().catch(() => undefined);
    }
  }

  private async commit(tmp: string, digest: string): Promise<void> {
    const dir = path.join(this.root, 'sha256');
    await fs.mkdir(dir, { recursive: true });
    await fs.rename(tmp, this.path(digest));
    // The rename is only durable once the directory entry is.
    const dh = await fs.open(dir, 'r');
    try {
      await dh.sync();
    } finally {
      await dh.close();
    }
  }
}

export function sha256Digest(bytes: Buffer | Uint8Array): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

function hexOf(digest: string): string {
  return validateDigest(digest).slice('sha256:'.length);
}

/** Feeds an existing partial file into `hash`, returning its length (0 if absent or unusable). */
async function hashExisting(file: string, hash: Hash, size: number | undefined): Promise<number> {
  let length: number;
  try {
    length = (await fs.stat(file)).size;
  } catch {
    return 0;
  }
  if (length === 0 || (size !== undefined && length > size)) return 0;
  for await (const chunk of createReadStream(file, { end: length - 1 }) as AsyncIterable<Buffer>) hash.update(chunk);
  return length;
}
