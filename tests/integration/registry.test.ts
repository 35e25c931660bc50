/**
 * Image distribution against the real thing: the reference registry (docker-registry 2.8), images
 * pushed by skopeo, archives written by skopeo. No VMs are booted.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, beforeEach, describe, expect, it, onTestFailed } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { importArchive } from '../../packages/daemon/src/images/archive.js';
import { BlobStore } from '../../packages/daemon/src/images/blobs.js';
import { parseReference } from '../../packages/daemon/src/images/reference.js';
import { pullImage, type PullOptions } from '../../packages/daemon/src/images/registry.js';
import { buildOciLayout, pushOciLayout, registryBlobPath, startRegistry, type BuiltImage, type TestRegistry } from '../support/registry.js';
import { rejection } from '../support/rejection.js';

const execFileP = promisify(execFile);

interface Request {
  url: string;
  range?: string;
}

/** A fetch that records what the client asked for, so tests can tell a cache hit from a download. */
function recordingFetch(): { fetch: typeof fetch; requests: Request[]; blobGets: (digest: string) => Request[] } {
  const requests: Request[] = [];
  const wrapped = (async (input: string | URL | Request, init?: RequestInit) => {
    const headers = (init?.headers ?? {}) as Record<string, string>;
    const r: Request = { url: String(input) };
    if (headers['Range']) r.range = headers['Range'];
    requests.push(r);
    return fetch(input as string, init);
  }) as typeof fetch;
  return { fetch: wrapped, requests, blobGets: (digest) => requests.filter((r) => r.url.endsWith(`/blobs/${digest}`)) };
}

let work: string;
let counter = 0;

function freshStore(): BlobStore {
  return new BlobStore(path.join(work, `store-${++counter}`));
}

function options(extra: PullOptions = {}): PullOptions {
  // Never read the real user's Docker credentials; pull the image's platform whatever the host is.
  return { dockerConfigPath: path.join(work, 'no-docker-config.json'), platform: { os: 'linux', architecture: 'amd64' }, ...extra };
}

beforeAll(() => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-registry-it-'));
});

afterAll(() => {
  fs.rmSync(work, { recursive: true, force: true });
});

describe('pulling from docker-registry without auth', () => {
  let registry: TestRegistry;
  let image: BuiltImage;
  let layoutDir: string;
  let big: BuiltImage;

  beforeAll(async () => {
    registry = await startRegistry();
    layoutDir = path.join(work, 'layout');
    image = await buildOciLayout(layoutDir, { tag: '1.2' });
    await pushOciLayout(layoutDir, `${registry.host}/team/tools:1.2`);

    // Random bytes do not compress: a layer big enough to interrupt part-way.
    const bigDir = path.join(work, 'layout-big');
    big = await buildOciLayout(bigDir, {
      layers: [[{ name: 'blob.bin', data: randomBytes(4 * 1024 * 1024) }], [{ name: 'x', data: 'x' }]],
    });
    await pushOciLayout(bigDir, `${registry.host}/team/big:1`);
  });

  afterAll(async () => {
    await registry?.stop();
  });

  beforeEach(() => {
    onTestFailed(async () => {
      console.error(await registry?.log().catch(() => 'no registry log'));
    });
  });

  it('pulls by tag what skopeo pushed, byte for byte', async () => {
    const store = freshStore();
    const pulled = await pullImage(parseReference(`${registry.host}/team/tools:1.2`), store, options());
    expect(pulled.reference).toBe(`${registry.host}/team/tools:1.2`);
    expect(pulled.digest).toBe(image.manifestDigest);
    expect(pulled.configDigest).toBe(image.configDigest);
    expect(pulled.layers.map((l) => l.digest)).toEqual(image.layerDigests);
    expect(pulled.layers.every((l) => l.mediaType === 'application/vnd.oci.image.layer.v1.tar+gzip')).toBe(true);
    expect(pulled.config).toMatchObject({
      cmd: ['/usr/bin/tool'],
      workingDir: '/srv',
      os: 'linux',
      architecture: 'amd64',
      diffIds: image.diffIds,
    });
    for (const d of image.layerDigests) {
      expect(fs.readFileSync(store.path(d)).equals(fs.readFileSync(path.join(layoutDir, 'blobs/sha256', d.slice(7))))).toBe(true);
    }
  });

  it('pulls by digest, and a second pull fetches no blobs', async () => {
    const store = freshStore();
    const first = recordingFetch();
    const byDigest = await pullImage(
      parseReference(`${registry.host}/team/tools@${image.manifestDigest}`),
      store,
      options({ fetch: first.fetch }),
    );
    expect(byDigest.digest).toBe(image.manifestDigest);
    expect(first.requests.filter((r) => r.url.includes('/blobs/'))).toHaveLength(3);

    const second = recordingFetch();
    await pullImage(parseReference(`${registry.host}/team/tools:1.2`), store, options({ fetch: second.fetch }));
    expect(second.requests.map((r) => new URL(r.url).pathname)).toEqual(['/v2/team/tools/manifests/1.2']);
  });

  it('reports an unknown tag and an unknown repository as NOT_FOUND', async () => {
    const tag = await rejection(pullImage(parseReference(`${registry.host}/team/tools:nope`), freshStore(), options()));
    expect(isAegisError(tag, 'NOT_FOUND')).toBe(true);
    const repo = await rejection(pullImage(parseReference(`${registry.host}/team/absent:1`), freshStore(), options()));
    expect(isAegisError(repo, 'NOT_FOUND')).toBe(true);
  });

  it('fetches each blob once when the same image is pulled twice concurrently into one store', async () => {
    const store = freshStore();
    const rec = recordingFetch();
    const ref = parseReference(`${registry.host}/team/tools:1.2`);
    const [a, b] = await Promise.all([
      pullImage(ref, store, options({ fetch: rec.fetch })),
      pullImage(ref, store, options({ fetch: rec.fetch })),
    ]);
    expect(a.digest).toBe(b.digest);
    for (const d of [image.configDigest, ...image.layerDigests]) expect(rec.blobGets(d)).toHaveLength(1);
  });

  it('resumes an interrupted pull with a Range request for the rest of the layer', async () => {
    const store = freshStore();
    const layer = big.layerDigests[0] as string;
    const ac = new AbortController();
    const interrupted = await rejection(
      pullImage(parseReference(`${registry.host}/team/big:1`), store, {
        ...options(),
        signal: ac.signal,
        onProgress: (p) => {
          if (p.digest === layer && p.doneBytes > 512 * 1024) ac.abort();
        },
      }),
    );
    expect(isAegisError(interrupted, 'CANCELLED')).toBe(true);
    const partial = fs.statSync(path.join(store.root, 'partial', layer.slice(7))).size;
    expect(partial).toBeGreaterThan(512 * 1024);
    expect(await store.has(layer)).toBe(false);

    const rec = recordingFetch();
    const pulled = await pullImage(parseReference(`${registry.host}/team/big:1`), store, options({ fetch: rec.fetch }));
    expect(pulled.digest).toBe(big.manifestDigest);
    const gets = rec.blobGets(layer);
    expect(gets).toHaveLength(1);
    expect(gets[0]?.range).toBe(`bytes=${partial}-`);
    expect(await store.has(layer)).toBe(true);
  });

  it('rejects a blob corrupted in the registry storage by its digest', async () => {
    const dir = path.join(work, 'layout-corrupt');
    const victim = await buildOciLayout(dir, { layers: [[{ name: 'only/me', data: 'corrupt me please\n' }]] });
    await pushOciLayout(dir, `${registry.host}/team/corrupt:1`);
    const layer = victim.layerDigests[0] as string;
    const file = registryBlobPath(registry, layer);
    fs.writeFileSync(file, Buffer.alloc(fs.statSync(file).size, 0x5a));

    const store = freshStore();
    const err = await rejection(pullImage(parseReference(`${registry.host}/team/corrupt:1`), store, options()));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect(err.message).toContain(layer);
    expect(await store.has(layer)).toBe(false);
  });

  it('reports a registry that is gone as UNAVAILABLE', async () => {
    const other = await startRegistry();
    const host = other.host;
    await other.stop();
    const err = await rejection(pullImage(parseReference(`${host}/team/tools:1.2`), freshStore(), options()));
    expect(isAegisError(err, 'UNAVAILABLE')).toBe(true);
  });

  it('imports a docker-archive written by skopeo, with the same config and diff_ids as the pull', async () => {
    const file = path.join(work, 'docker-archive.tar');
    await execFileP('skopeo', ['copy', '--insecure-policy', '--quiet', `oci:${layoutDir}`, `docker-archive:${file}:team/tools:1.2`]);
    const store = freshStore();
    const [imported, ...rest] = await importArchive(file, store);
    expect(rest).toEqual([]);
    expect(imported?.reference).toBe('docker.io/team/tools:1.2');
    expect(imported?.configDigest).toBe(image.configDigest);
    // docker archives carry layers uncompressed: their digests are the diff_ids
    expect(imported?.layers.map((l) => l.digest)).toEqual(image.diffIds);
    expect(imported?.layers.every((l) => l.mediaType === 'application/vnd.docker.image.rootfs.diff.tar')).toBe(true);
    for (const l of imported?.layers ?? []) expect(await store.has(l.digest)).toBe(true);
    expect(await store.has(imported?.digest ?? '')).toBe(true);
  });

  it('imports an OCI image layout tar, naming it from its ref.name and the given repository', async () => {
    const file = path.join(work, 'oci-layout.tar');
    await execFileP('tar', ['-cf', file, '-C', layoutDir, '.']);
    const store = freshStore();
    const [imported] = await importArchive(file, store, { name: 'team/tools' });
    expect(imported?.reference).toBe('docker.io/team/tools:1.2');
    expect(imported?.digest).toBe(image.manifestDigest);
    expect(imported?.layers.map((l) => l.digest)).toEqual(image.layerDigests);
  });
});

describe('pulling from docker-registry behind token auth', () => {
  const creds = { user: 'aegis', password: 'correct horse' };
  let registry: TestRegistry;
  let image: BuiltImage;

  beforeAll(async () => {
    registry = await startRegistry({ tokenAuth: creds });
    const dir = path.join(work, 'layout-auth');
    image = await buildOciLayout(dir, { tag: '1.2', cmd: ['/bin/secret'] });
    await pushOciLayout(dir, `${registry.host}/team/tools:1.2`, creds);
  });

  afterAll(async () => {
    await registry?.stop();
  });

  beforeEach(() => {
    onTestFailed(async () => {
      console.error(await registry?.log().catch(() => 'no registry log'));
    });
  });

  it('answers the Bearer challenge with a token obtained with the Docker config credentials', async () => {
    const config = path.join(work, 'docker-config.json');
    const auth = Buffer.from(`${creds.user}:${creds.password}`).toString('base64');
    fs.writeFileSync(config, JSON.stringify({ auths: { [registry.host]: { auth } } }));
    const rec = recordingFetch();
    const pulled = await pullImage(parseReference(`${registry.host}/team/tools:1.2`), freshStore(), {
      ...options(),
      dockerConfigPath: config,
      fetch: rec.fetch,
    });
    expect(pulled.digest).toBe(image.manifestDigest);
    expect(pulled.config.cmd).toEqual(['/bin/secret']);
    expect(rec.requests.some((r) => r.url.includes('/token?'))).toBe(true);
  });

  it('fails with FAILED_PRECONDITION, not leaking the password, when the credentials are wrong', async () => {
    const err = await rejection(
      pullImage(parseReference(`${registry.host}/team/tools:1.2`), freshStore(), {
        ...options(),
        credentials: { username: creds.user, password: 'wrong battery' },
      }),
    );
    expect(isAegisError(err, 'FAILED_PRECONDITION')).toBe(true);
    expect(err.message).not.toContain('wrong battery');
  });

  it('fails with FAILED_PRECONDITION asking to log in when pulling anonymously', async () => {
    const err = await rejection(pullImage(parseReference(`${registry.host}/team/tools:1.2`), freshStore(), options()));
    expect(isAegisError(err, 'FAILED_PRECONDITION')).toBe(true);
    expect(err.message).toContain('log in');
  });
});
