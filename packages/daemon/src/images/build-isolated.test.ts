import { createWriteStream, promises as fs, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { bombLayer } from '../../../../tests/support/import-bomb.js';
import { buildIsolated } from './build-isolated.js';
import { buildImageFilesystem, type LayerFile } from './layers.js';

const TAR_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
let tmp: string;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-build-isolated-'));
});
afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

async function bombFile(files: number): Promise<LayerFile> {
  const file = path.join(tmp, `layer-${files}.tar.gz`);
  await pipeline(bombLayer(files), createGzip({ level: 1 }), createWriteStream(file));
  return { path: file, mediaType: TAR_GZIP };
}

async function outcome(p: Promise<unknown>): Promise<string> {
  return p.then(
    () => 'built',
    (err: Error) => (isAegisError(err) ? `${err.code}: ${err.message}` : `not an AegisError: ${String(err)}`),
  );
}

describe('buildIsolated: image filesystems built in a worker thread with a capped heap', () => {
  it('builds the very bytes the daemon thread would, and leaves only the image', async () => {
    const layers = [await bombFile(2_000)];
    const dir = await fs.mkdtemp(path.join(tmp, 'same-'));
    const built = await buildIsolated(layers, path.join(dir, 'worker.ext4'));
    expect(built.fileCount).toBe(2_000 + 2);
    await buildImageFilesystem(layers, path.join(tmp, 'thread.ext4'));
    expect(readFileSync(path.join(dir, 'worker.ext4')).equals(readFileSync(path.join(tmp, 'thread.ext4')))).toBe(true);
    expect(await fs.readdir(dir)).toEqual(['worker.ext4']);
  });

  it('refuses with RESOURCE_EXHAUSTED an image whose tree outgrows the heap, leaving nothing behind (and the daemon up)', async () => {
    const dir = await fs.mkdtemp(path.join(tmp, 'oom-'));
    // 200,000 entries are ~50 MiB of tree: past a 24 MiB heap long before the entry limits.
    const result = await outcome(buildIsolated([await bombFile(200_000)], path.join(dir, 'out.ext4'), { heapMiB: 24 }));
    expect(result).toBe("RESOURCE_EXHAUSTED: preparing the image's filesystem needed more than 24 MiB of memory, the limit per image");
    expect(await fs.readdir(dir)).toEqual([]);
  }, 60_000);

  it('limits still refuse with their own message, from inside the worker', async () => {
    const dir = await fs.mkdtemp(path.join(tmp, 'limit-'));
    const result = await outcome(
      buildIsolated([await bombFile(20_000)], path.join(dir, 'out.ext4'), { limits: { entriesPerLayer: 5_000 } }),
    );
    expect(result).toMatch(/^RESOURCE_EXHAUSTED: layer 1 \(.*\) exceeds 5,000 entries, the limit per layer$/);
    expect(await fs.readdir(dir)).toEqual([]);
  });

  it('is cancelled by its signal mid-build, leaving nothing behind', async () => {
    const dir = await fs.mkdtemp(path.join(tmp, 'abort-'));
    const controller = new AbortController();
    const building = outcome(buildIsolated([await bombFile(200_000)], path.join(dir, 'out.ext4'), { signal: controller.signal }));
    setTimeout(() => controller.abort(), 300);
    expect(await building).toBe('CANCELLED: building the image filesystem was cancelled');
    expect(await fs.readdir(dir)).toEqual([]);
  });
});
