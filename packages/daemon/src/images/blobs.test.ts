import { createHash } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { BlobStore, sha256Digest } from './blobs.js';
import { rejection } from '../../../../tests/support/rejection.js';

function digestOf(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

/** A stream of `bytes` from `offset`, in small chunks, failing after `failAfter` bytes if given. */
function source(bytes: Buffer, offset: number, failAfter?: number): Readable {
  const chunks: Buffer[] = [];
  for (let i = offset; i < bytes.length; i += 1000) chunks.push(bytes.subarray(i, Math.min(i + 1000, bytes.length)));
  let sent = 0;
  return Readable.from(
    (async function* () {
      for (const c of chunks) {
        if (failAfter !== undefined && sent >= failAfter) throw new Error('connection reset');
        sent += c.length;
        yield c;
      }
    })(),
  );
}

describe('BlobStore', () => {
  let root: string;
  let store: BlobStore;
  const data = Buffer.from(Array.from({ length: 10_000 }, (_, i) => i % 251));
  const digest = digestOf(data);

  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-blobs-test-'));
    store = new BlobStore(root);
  });

  afterEach(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('stores a blob under sha256/<hex> after verifying it', async () => {
    const offsets: number[] = [];
    const file = await store.ingest(digest, data.length, async (offset) => {
      offsets.push(offset);
      return source(data, offset);
    });
    expect(file).toBe(path.join(root, 'sha256', digest.slice(7)));
    expect(fs.readFileSync(file).equals(data)).toBe(true);
    expect(offsets).toEqual([0]);
    expect(await store.has(digest)).toBe(true);
    expect(fs.readdirSync(path.join(root, 'partial'))).toEqual([]);
  });

  it('does not open the source for a blob it already has', async () => {
    await store.ingest(digest, data.length, async (o) => source(data, o));
    await store.ingest(digest, data.length, async () => {
      throw new Error('should not be opened');
    });
  });

  it('reports progress up to the total', async () => {
    const seen: number[] = [];
    await store.ingest(
      digest,
      data.length,
      async (o) => source(data, o),
      (done, total) => {
        expect(total).toBe(data.length);
        seen.push(done);
      },
    );
    expect(seen.at(-1)).toBe(data.length);
  });

  it('keeps a truncated download and resumes it from the bytes already on disk', async () => {
    const first = await rejection(store.ingest(digest, data.length, async (o) => source(data, o, 4000)));
    expect(isAegisError(first, 'UNAVAILABLE')).toBe(true);
    expect(fs.statSync(path.join(root, 'partial', digest.slice(7))).size).toBe(4000);
    expect(await store.has(digest)).toBe(false);

    const offsets: number[] = [];
    await store.ingest(digest, data.length, async (offset) => {
      offsets.push(offset);
      return source(data, offset);
    });
    expect(offsets).toEqual([4000]);
    expect(fs.readFileSync(store.path(digest)).equals(data)).toBe(true);
  });

  it('reports a stream that ends early as UNAVAILABLE', async () => {
    const err = await rejection(store.ingest(digest, data.length, async () => Readable.from([data.subarray(0, 10)])));
    expect(isAegisError(err, 'UNAVAILABLE')).toBe(true);
  });

  it('discards content that does not match its digest, including a corrupt resumed prefix', async () => {
    fs.mkdirSync(path.join(root, 'partial'), { recursive: true });
    fs.writeFileSync(path.join(root, 'partial', digest.slice(7)), Buffer.alloc(3000, 7));
    const err = await rejection(store.ingest(digest, data.length, async (o) => source(data, o)));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect((err as Error).message).toContain('does not match');
    expect(fs.existsSync(path.join(root, 'partial', digest.slice(7)))).toBe(false);
    expect(await store.has(digest)).toBe(false);
    // and the next attempt starts over and succeeds
    await store.ingest(digest, data.length, async (o) => source(data, o));
    expect(await store.has(digest)).toBe(true);
  });

  it('rejects a blob longer than its declared size', async () => {
    const err = await rejection(store.ingest(digest, data.length - 1, async (o) => source(data, o)));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
  });

  it('shares one download between concurrent ingests of the same digest', async () => {
    let opens = 0;
    const open = async (offset: number): Promise<Readable> => {
      opens++;
      await new Promise((r) => setTimeout(r, 20));
      return source(data, offset);
    };
    const paths = await Promise.all([store.ingest(digest, data.length, open), store.ingest(digest, data.length, open)]);
    expect(opens).toBe(1);
    expect(paths[0]).toBe(paths[1]);
  });

  it('takes over a shared download when the other caller cancels it, resuming from its bytes', async () => {
    const ac = new AbortController();
    const offsets: number[] = [];
    const cancelled = store.ingest(
      digest,
      data.length,
      async (offset) => {
        offsets.push(offset);
        return source(data, offset, 5000);
      },
      (done) => {
        if (done >= 5000) ac.abort();
      },
      ac.signal,
    );
    const survivor = store.ingest(digest, data.length, async (offset) => {
      offsets.push(offset);
      return source(data, offset);
    });
    const err = await rejection(cancelled);
    expect(isAegisError(err, 'CANCELLED')).toBe(true);
    await survivor;
    expect(offsets).toEqual([0, 5000]);
    expect(fs.readFileSync(store.path(digest)).equals(data)).toBe(true);
  });

  it('validates digests: malformed is INVALID_ARGUMENT, another algorithm is UNSUPPORTED', async () => {
    const open = async (): Promise<Readable> => Readable.from([]);
    expect(isAegisError(await rejection(store.ingest('sha256:xyz', 0, open)), 'INVALID_ARGUMENT')).toBe(true);
    expect(isAegisError(await rejection(store.ingest(`sha512:${'a'.repeat(128)}`, 0, open)), 'UNSUPPORTED')).toBe(true);
    expect(() => store.path('../../etc/passwd')).toThrow();
  });

  it('ingests a one-shot stream and a local file, verifying both', async () => {
    await store.ingestStream(digest, data.length, Readable.from([data]));
    expect(await store.has(digest)).toBe(true);

    const other = Buffer.from('hello, layer');
    const file = path.join(root, 'layer.tar');
    fs.writeFileSync(file, other);
    await store.ingestFile(sha256Digest(other), file);
    expect(fs.readFileSync(store.path(sha256Digest(other))).toString()).toBe('hello, layer');

    const wrong = await rejection(store.ingestFile(digestOf(Buffer.from('something else')), file));
    expect(isAegisError(wrong, 'INVALID_ARGUMENT')).toBe(true);
  });

  it('puts and reads small documents, refusing oversized reads', async () => {
    const doc = Buffer.from('{"a":1}');
    await store.put(sha256Digest(doc), doc);
    expect((await store.read(sha256Digest(doc), 100)).toString()).toBe('{"a":1}');
    expect(isAegisError(await rejection(store.read(sha256Digest(doc), 3)), 'RESOURCE_EXHAUSTED')).toBe(true);
    expect(isAegisError(await rejection(store.put(digest, doc)), 'INVALID_ARGUMENT')).toBe(true);
    expect(isAegisError(await rejection(store.read(digest, 100)), 'NOT_FOUND')).toBe(true);
  });
});
