import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import * as tar from 'tar-stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { importArchive } from './archive.js';
import { BlobStore, sha256Digest } from './blobs.js';
import { MEDIA_TYPES, parseManifestDocument } from './manifest.js';
import { MAX_DOCUMENT_BYTES } from './limits.js';
import { ImageService } from './service.js';
import { Registry } from '../registry/db.js';
import { writeDockerSaveBomb } from '../../../../tests/support/import-bomb.js';
import { rejection } from '../../../../tests/support/rejection.js';

type TarEntry = { name: string; data: Buffer } | { name: string; symlink: string };

async function writeTar(file: string, entries: TarEntry[], gzip = false): Promise<void> {
  const pack = tar.pack();
  for (const e of entries) {
    if ('data' in e) pack.entry({ name: e.name }, e.data);
    else pack.entry({ name: e.name, type: 'symlink', linkname: e.symlink });
  }
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
  const bytes = Buffer.concat(chunks);
  fs.writeFileSync(file, gzip ? gzipSync(bytes) : bytes);
}

const json = (v: unknown): Buffer => Buffer.from(JSON.stringify(v));
const hex = (d: string): string => d.slice('sha256:'.length);

function config(arch: string, diffIds: string[]): Buffer {
  return json({ architecture: arch, os: 'linux', config: { Cmd: ['/bin/true'] }, rootfs: { type: 'layers', diff_ids: diffIds } });
}

/** An OCI layout whose blobs are fake (the importer only checks digests, not tar contents). */
function ociLayout(arch = 'amd64', annotations?: Record<string, string>) {
  const layer = Buffer.from(`gzip-layer-bytes-for-${arch}`);
  const cfg = config(arch, [sha256Digest(Buffer.from(`diff-${arch}`))]);
  const manifest = json({
    schemaVersion: 2,
    mediaType: MEDIA_TYPES.ociManifest,
    config: { mediaType: MEDIA_TYPES.ociConfig, digest: sha256Digest(cfg), size: cfg.length },
    layers: [{ mediaType: MEDIA_TYPES.ociLayerGzip, digest: sha256Digest(layer), size: layer.length }],
  });
  const descriptor = { mediaType: MEDIA_TYPES.ociManifest, digest: sha256Digest(manifest), size: manifest.length, annotations };
  const blobs: TarEntry[] = [layer, cfg, manifest].map((b) => ({ name: `blobs/sha256/${hex(sha256Digest(b))}`, data: b }));
  return { layer, cfg, manifest, descriptor, blobs };
}

describe('importArchive', () => {
  let root: string;
  let store: BlobStore;

  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-archive-test-'));
    store = new BlobStore(path.join(root, 'store'));
  });

  afterEach(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  it('imports an OCI layout, naming a tag-only ref.name with the given repository', async () => {
    const img = ociLayout('amd64', { 'org.opencontainers.image.ref.name': '1.2' });
    const file = path.join(root, 'oci.tar');
    // index.json last: the importer must not depend on entry order
    await writeTar(file, [
      { name: 'oci-layout', data: json({ imageLayoutVersion: '1.0.0' }) },
      ...img.blobs,
      { name: 'index.json', data: json({ schemaVersion: 2, manifests: [img.descriptor] }) },
    ]);
    const [image, ...rest] = await importArchive(file, store, { name: 'team/tools' });
    expect(rest).toEqual([]);
    expect(image?.reference).toBe('docker.io/team/tools:1.2');
    expect(image?.digest).toBe(sha256Digest(img.manifest));
    expect(image?.layers).toEqual([{ digest: sha256Digest(img.layer), mediaType: MEDIA_TYPES.ociLayerGzip, size: img.layer.length }]);
    expect(image?.config.cmd).toEqual(['/bin/true']);
    for (const b of [img.layer, img.cfg, img.manifest]) expect(await store.has(sha256Digest(b))).toBe(true);

    const [unnamed] = await importArchive(file, new BlobStore(path.join(root, 'other')));
    expect(unnamed?.reference).toBeUndefined();
  });

  it('takes a full reference from the annotations, and reads a gzipped archive', async () => {
    const img = ociLayout('amd64', { 'org.opencontainers.image.ref.name': 'registry.example:5000/team/tools:2' });
    const file = path.join(root, 'oci.tar.gz');
    await writeTar(
      file,
      [
        { name: './oci-layout', data: json({ imageLayoutVersion: '1.0.0' }) },
        { name: './index.json', data: json({ schemaVersion: 2, manifests: [img.descriptor] }) },
        ...img.blobs.map((b) => ({ ...b, name: `./${b.name}` })),
      ],
      true,
    );
    const [image] = await importArchive(file, store);
    expect(image?.reference).toBe('registry.example:5000/team/tools:2');
  });

  it('imports only the host-platform entry of a multi-platform index', async () => {
    const amd = ociLayout('amd64');
    const arm = ociLayout('arm64');
    const index = json({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.ociIndex,
      manifests: [
        { ...amd.descriptor, platform: { os: 'linux', architecture: 'amd64' } },
        { ...arm.descriptor, platform: { os: 'linux', architecture: 'arm64' } },
      ],
    });
    const file = path.join(root, 'multi.tar');
    await writeTar(file, [
      { name: 'oci-layout', data: json({ imageLayoutVersion: '1.0.0' }) },
      {
        name: 'index.json',
        data: json({ schemaVersion: 2, manifests: [{ mediaType: MEDIA_TYPES.ociIndex, digest: sha256Digest(index), size: index.length }] }),
      },
      { name: `blobs/sha256/${hex(sha256Digest(index))}`, data: index },
      ...amd.blobs,
      ...arm.blobs,
    ]);
    const [image] = await importArchive(file, store, { platform: { os: 'linux', architecture: 'arm64' } });
    expect(image?.config.architecture).toBe('arm64');
    expect(await store.has(sha256Digest(arm.layer))).toBe(true);
    expect(await store.has(sha256Digest(amd.layer))).toBe(false);
  });

  it('rejects an OCI layout whose blob does not match its name, storing nothing for it', async () => {
    const img = ociLayout();
    const file = path.join(root, 'bad.tar');
    const layerName = `blobs/sha256/${hex(sha256Digest(img.layer))}`;
    await writeTar(file, [
      { name: 'oci-layout', data: json({ imageLayoutVersion: '1.0.0' }) },
      { name: 'index.json', data: json({ schemaVersion: 2, manifests: [img.descriptor] }) },
      ...img.blobs.map((b) => (b.name === layerName ? { name: layerName, data: Buffer.alloc(img.layer.length, 1) } : b)),
    ]);
    const err = await rejection(importArchive(file, store));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect(await store.has(sha256Digest(img.layer))).toBe(false);
  });

  it('imports a legacy docker save archive, following symlinked layers and checking diff_ids', async () => {
    const base = Buffer.from('uncompressed base layer tar');
    const top = Buffer.from('uncompressed top layer tar');
    const cfgA = config('amd64', [sha256Digest(base), sha256Digest(top)]);
    const cfgB = config('amd64', [sha256Digest(base)]);
    const file = path.join(root, 'save.tar');
    await writeTar(file, [
      { name: 'aaa/layer.tar', data: base },
      { name: 'bbb/layer.tar', data: top },
      { name: 'ccc/layer.tar', symlink: '../aaa/layer.tar' },
      { name: `${hex(sha256Digest(cfgA))}.json`, data: cfgA },
      { name: `${hex(sha256Digest(cfgB))}.json`, data: cfgB },
      {
        name: 'manifest.json',
        data: json([
          {
            Config: `${hex(sha256Digest(cfgA))}.json`,
            RepoTags: ['team/tools:1.2', 'team/tools:latest'],
            Layers: ['aaa/layer.tar', 'bbb/layer.tar'],
          },
          { Config: `${hex(sha256Digest(cfgB))}.json`, RepoTags: null, Layers: ['ccc/layer.tar'] },
        ]),
      },
    ]);
    const images = await importArchive(file, store);
    expect(images.map((i) => i.reference)).toEqual(['docker.io/team/tools:1.2', 'docker.io/team/tools:latest', undefined]);
    const [a, , b] = images;
    expect(a?.layers).toEqual([
      { digest: sha256Digest(base), mediaType: MEDIA_TYPES.dockerLayer, size: base.length },
      { digest: sha256Digest(top), mediaType: MEDIA_TYPES.dockerLayer, size: top.length },
    ]);
    expect(b?.layers.map((l) => l.digest)).toEqual([sha256Digest(base)]);
    expect(a?.configDigest).toBe(sha256Digest(cfgA));
    // the synthesised manifest is stored, so the image can be addressed by its digest
    const manifest = parseManifestDocument(await store.read(a?.digest ?? '', 1 << 20));
    expect(manifest.kind === 'manifest' && manifest.layers.map((l) => l.digest)).toEqual([sha256Digest(base), sha256Digest(top)]);
    // and importing the same archive again gives the same digest
    const again = await importArchive(file, new BlobStore(path.join(root, 'again')));
    expect(again[0]?.digest).toBe(a?.digest);
  });

  it("--name names what it imports whatever the archive's RepoTags claim; one name for several images is refused", async () => {
    const layer = Buffer.from('uncompressed layer tar');
    const cfg = config('amd64', [sha256Digest(layer)]);
    const entry = { Config: `${hex(sha256Digest(cfg))}.json`, RepoTags: ['library/python:3.12'], Layers: ['l/layer.tar'] };
    const file = path.join(root, 'claims.tar');
    const files = [
      { name: 'l/layer.tar', data: layer },
      { name: `${hex(sha256Digest(cfg))}.json`, data: cfg },
    ];
    await writeTar(file, [...files, { name: 'manifest.json', data: json([entry]) }]);
    expect((await importArchive(file, store, { name: 'evil:2' })).map((i) => i.reference)).toEqual(['docker.io/library/evil:2']);
    expect((await importArchive(file, store)).map((i) => i.reference)).toEqual(['docker.io/library/python:3.12']);
    const two = path.join(root, 'two.tar');
    await writeTar(two, [...files, { name: 'manifest.json', data: json([entry, { ...entry, RepoTags: null }]) }]);
    await expect(importArchive(two, store, { name: 'evil:2' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });

  it('rejects a docker save layer that does not match its diff_id', async () => {
    const layer = Buffer.from('layer');
    const cfg = config('amd64', [sha256Digest(Buffer.from('something else'))]);
    const file = path.join(root, 'save.tar');
    await writeTar(file, [
      { name: 'x/layer.tar', data: layer },
      { name: 'config.json', data: cfg },
      { name: 'manifest.json', data: json([{ Config: 'config.json', RepoTags: ['t:1'], Layers: ['x/layer.tar'] }]) },
    ]);
    const err = await rejection(importArchive(file, store));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect(err.message).toContain('diff_id');
  });

  it('rejects files that are not image archives', async () => {
    const notTar = path.join(root, 'junk.tar');
    fs.writeFileSync(notTar, Buffer.alloc(2000, 0x41));
    expect(isAegisError(await rejection(importArchive(notTar, store)), 'INVALID_ARGUMENT')).toBe(true);

    const empty = path.join(root, 'empty.tar');
    await writeTar(empty, [{ name: 'hello.txt', data: Buffer.from('hi') }]);
    const err = await rejection(importArchive(empty, store));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect(err.message).toContain('neither');

    expect(isAegisError(await rejection(importArchive(path.join(root, 'missing.tar'), store)), 'NOT_FOUND')).toBe(true);
  });
});

describe('import bombs (issue 26)', () => {
  let root: string;

  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-bomb-test-'));
  });

  afterEach(() => {
    fs.rmSync(root, { recursive: true, force: true });
  });

  /** Every file under `dir`, relative to it. */
  const files = (dir: string): string[] =>
    fs.existsSync(dir)
      ? (fs.readdirSync(dir, { recursive: true, withFileTypes: true }) as fs.Dirent[]).filter((e) => e.isFile()).map((e) => e.name)
      : [];

  it('an import bomb of 200k empty files is refused at the entry limit, storing no image, filesystem or blob', async () => {
    const file = path.join(root, 'bomb.tar.gz');
    const archiveBytes = await writeDockerSaveBomb(file, 200_000);
    expect(archiveBytes).toBeLessThan(3 << 20);
    const home = path.join(root, 'home');
    fs.mkdirSync(home);
    const registry = new Registry(path.join(home, 'aegis.db'));
    try {
      const log = { info: () => undefined, warn: () => undefined };
      const images = new ImageService(home, registry, log, { insecureRegistries: [], limits: { entriesPerLayer: 20_000 } });
      const err = await rejection(images.import(file, undefined));
      expect([isAegisError(err) && err.code, err.message]).toEqual([
        'RESOURCE_EXHAUSTED',
        expect.stringMatching(/^layer 1 \([0-9a-f]{64}\) exceeds 20,000 entries, the limit per layer$/),
      ]);
      expect(images.list()).toEqual([]);
      expect(files(path.join(home, 'images'))).toEqual([]);
    } finally {
      registry.close();
    }
  }, 60_000);

  it('an oversized manifest.json is refused before anything is stored', async () => {
    const file = path.join(root, 'big-manifest.tar');
    await writeTar(file, [{ name: 'manifest.json', data: Buffer.alloc(MAX_DOCUMENT_BYTES + 1, 0x20) }]);
    const store = new BlobStore(path.join(root, 'store'));
    const err = await rejection(importArchive(file, store));
    expect([isAegisError(err) && err.code, err.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      'manifest.json in the archive exceeds 4 MiB, the limit per document',
    ]);
    expect(files(store.root)).toEqual([]);
  });

  it('an oversized config is refused before any layer is stored', async () => {
    const layer = Buffer.alloc(1024);
    const cfg = Buffer.concat([
      config('amd64', [sha256Digest(layer)]).subarray(0, -1),
      Buffer.from(`,"pad":"${'x'.repeat(MAX_DOCUMENT_BYTES)}"}`),
    ]);
    const file = path.join(root, 'big-config.tar');
    await writeTar(file, [
      { name: 'layer.tar', data: layer },
      { name: 'config.json', data: cfg },
      { name: 'manifest.json', data: json([{ Config: 'config.json', Layers: ['layer.tar'] }]) },
    ]);
    const store = new BlobStore(path.join(root, 'store'));
    const err = await rejection(importArchive(file, store));
    expect([isAegisError(err) && err.code, err.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      'config.json in the archive exceeds 4 MiB, the limit per document',
    ]);
    expect(files(store.root)).toEqual([]);
  });

  it('layers bigger than the unpacked limit are refused before they are copied into the store', async () => {
    const layer = Buffer.alloc(4096);
    const file = path.join(root, 'big-layer.tar');
    await writeTar(file, [
      { name: 'layer.tar', data: layer },
      { name: 'config.json', data: config('amd64', [sha256Digest(layer)]) },
      { name: 'manifest.json', data: json([{ Config: 'config.json', Layers: ['layer.tar'] }]) },
    ]);
    const store = new BlobStore(path.join(root, 'store'));
    const err = await rejection(importArchive(file, store, { limits: { unpackedBytesPerImage: 1024 } }));
    expect([isAegisError(err) && err.code, err.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      expect.stringMatching(/^the layers of image sha256:[0-9a-f]{64} in the archive exceeds 1 KiB, the limit unpacked per image$/),
    ]);
    expect(files(store.root)).toEqual([]);
  });

  it('an archive of more entries than the limit is refused while it is first read', async () => {
    const file = path.join(root, 'many.tar');
    await writeTar(
      file,
      Array.from({ length: 20 }, (_, i) => ({ name: `junk/${i}`, data: Buffer.alloc(0) })),
    );
    const err = await rejection(importArchive(file, new BlobStore(path.join(root, 'store')), { limits: { archiveEntries: 10 } }));
    expect([isAegisError(err) && err.code, err.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      'the archive exceeds 10 entries, the limit per archive',
    ]);
  });
});
