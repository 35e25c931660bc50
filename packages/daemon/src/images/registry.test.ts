import fs from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { BlobStore, sha256Digest } from './blobs.js';
import { parseReference } from './reference.js';
import { MEDIA_TYPES, parseImageConfig, selectManifest } from './manifest.js';
import { parseChallenge } from './registry-client.js';
import { pullImage, type PullOptions } from './registry.js';
import { rejection } from '../../../../tests/support/rejection.js';

interface Manifest {
  bytes: Buffer;
  mediaType: string;
}

/** A synthetic single-platform image: layer content need not be a real tar for the wire client. */
function makeImage(arch = 'amd64', layerSizes = [50_000, 3000], layerType: string = MEDIA_TYPES.ociLayerGzip) {
  const layers = layerSizes.map((n, i) => Buffer.from(Array.from({ length: n }, (_, j) => (j * (i + 7) + arch.charCodeAt(1)) % 256)));
  const config = Buffer.from(
    JSON.stringify({
      architecture: arch,
      os: 'linux',
      created: '2024-01-01T00:00:00Z',
      config: { Env: ['PATH=/usr/bin:/bin'], Entrypoint: ['/bin/sh'], Cmd: ['-c', 'true'], WorkingDir: '/work', User: '1000' },
      rootfs: { type: 'layers', diff_ids: layers.map((l) => sha256Digest(Buffer.concat([l, Buffer.from('u')]))) },
    }),
  );
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: MEDIA_TYPES.ociManifest,
      config: { mediaType: MEDIA_TYPES.ociConfig, digest: sha256Digest(config), size: config.length },
      layers: layers.map((l) => ({ mediaType: layerType, digest: sha256Digest(l), size: l.length })),
    }),
  );
  const blobs = new Map<string, Buffer>([[sha256Digest(config), config], ...layers.map((l): [string, Buffer] => [sha256Digest(l), l])]);
  return { manifest: { bytes: manifest, mediaType: MEDIA_TYPES.ociManifest }, blobs, layers, config };
}

interface StubOptions {
  auth?: 'bearer' | 'basic';
  user?: string;
  password?: string;
}

/** Just enough of the distribution API, with knobs for the failures the client must survive. */
class StubRegistry {
  readonly manifests = new Map<string, Manifest>(); // `${repo}:${ref}`
  readonly blobs = new Map<string, Buffer>();
  readonly requests: { method: string; url: string; range?: string; authorization?: string }[] = [];
  /** Digests whose next GET sends this many bytes and then drops the connection. */
  readonly cutAfter = new Map<string, number>();
  ignoreRange = false;
  sendDigestHeader: string | undefined;
  private server = http.createServer((req, res) => this.handle(req, res));
  host = '';

  constructor(private readonly opts: StubOptions = {}) {}

  async start(): Promise<void> {
    await new Promise<void>((resolve) => this.server.listen(0, '127.0.0.1', resolve));
    this.host = `127.0.0.1:${(this.server.address() as AddressInfo).port}`;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
  }

  addImage(repo: string, tag: string, image: ReturnType<typeof makeImage>): string {
    const digest = sha256Digest(image.manifest.bytes);
    this.manifests.set(`${repo}:${tag}`, image.manifest);
    this.manifests.set(`${repo}:${digest}`, image.manifest);
    for (const [d, b] of image.blobs) this.blobs.set(d, b);
    return digest;
  }

  blobGets(): string[] {
    return this.requests.filter((r) => r.url.includes('/blobs/')).map((r) => r.url.split('/').at(-1) as string);
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const url = new URL(req.url ?? '/', 'http://stub');
    const entry: (typeof this.requests)[number] = { method: req.method ?? '', url: url.pathname };
    if (req.headers.range) entry.range = req.headers.range;
    if (req.headers.authorization) entry.authorization = req.headers.authorization;
    this.requests.push(entry);
    const basic = `Basic ${Buffer.from(`${this.opts.user}:${this.opts.password}`).toString('base64')}`;

    if (url.pathname === '/token') {
      if (req.headers.authorization !== basic) return void res.writeHead(401).end('{"details":"bad creds"}');
      res.writeHead(200, { 'content-type': 'application/json' });
      return void res.end(JSON.stringify({ token: `tok-for-${url.searchParams.get('scope')}`, expires_in: 300 }));
    }
    if (this.opts.auth === 'bearer' && !req.headers.authorization?.startsWith('Bearer tok-for-repository:')) {
      res.writeHead(401, {
        'www-authenticate': `Bearer realm="http://${this.host}/token",service="stub",scope="repository:${url.pathname.split('/').slice(2, -2).join('/')}:pull"`,
        'content-type': 'application/json',
      });
      return void res.end('{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}');
    }
    if (this.opts.auth === 'basic' && req.headers.authorization !== basic) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="stub"' });
      return void res.end();
    }

    const m = /^\/v2\/(.+)\/(manifests|blobs)\/([^/]+)$/.exec(url.pathname);
    if (!m) return void res.writeHead(404).end();
    const [, repo, kind, ref] = m as unknown as [string, string, string, string];
    if (kind === 'manifests') {
      const manifest = this.manifests.get(`${repo}:${ref}`);
      if (!manifest) {
        res.writeHead(404, { 'content-type': 'application/json' });
        return void res.end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}');
      }
      res.writeHead(200, {
        'content-type': manifest.mediaType,
        'docker-content-digest': this.sendDigestHeader ?? sha256Digest(manifest.bytes),
        'content-length': manifest.bytes.length,
      });
      return void res.end(manifest.bytes);
    }
    const blob = this.blobs.get(ref);
    if (!blob) return void res.writeHead(404).end('{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}');
    const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    const start = range && !this.ignoreRange ? Number(range[1]) : 0;
    const body = blob.subarray(start);
    if (start > 0) {
      res.writeHead(206, { 'content-range': `bytes ${start}-${blob.length - 1}/${blob.length}`, 'content-length': body.length });
    } else {
      res.writeHead(200, { 'content-length': body.length });
    }
    const cut = this.cutAfter.get(ref);
    if (cut !== undefined) {
      this.cutAfter.delete(ref);
      res.write(body.subarray(0, cut), () => setTimeout(() => res.socket?.destroy(), 20));
      return;
    }
    res.end(body);
  }
}

describe('pullImage against a stub registry', () => {
  let root: string;
  let store: BlobStore;
  let registry: StubRegistry;
  let base: PullOptions;

  beforeEach(() => {
    root = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-registry-test-'));
    store = new BlobStore(path.join(root, 'blobs'));
    // Never read the real user's Docker credentials in tests.
    base = { dockerConfigPath: path.join(root, 'no-such-config.json'), platform: { os: 'linux', architecture: 'amd64' } };
  });

  afterEach(async () => {
    await registry?.stop();
    fs.rmSync(root, { recursive: true, force: true });
  });

  async function start(opts?: StubOptions): Promise<StubRegistry> {
    registry = new StubRegistry(opts);
    await registry.start();
    return registry;
  }

  it('pulls by tag, verifies every blob, and returns the parsed config', async () => {
    const reg = await start();
    const image = makeImage();
    const digest = reg.addImage('team/tools', '1.2', image);
    const phases = new Set<string>();
    const pulled = await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, {
      ...base,
      onProgress: (p) => phases.add(p.phase),
    });

    expect(pulled.reference).toBe(`${reg.host}/team/tools:1.2`);
    expect(pulled.digest).toBe(digest);
    expect(pulled.configDigest).toBe(sha256Digest(image.config));
    expect(pulled.layers.map((l) => l.size)).toEqual([50_000, 3000]);
    expect(pulled.sizeBytes).toBe(image.config.length + 53_000);
    expect(pulled.config).toMatchObject({
      env: ['PATH=/usr/bin:/bin'],
      entrypoint: ['/bin/sh'],
      cmd: ['-c', 'true'],
      workingDir: '/work',
      user: '1000',
      architecture: 'amd64',
      os: 'linux',
    });
    for (const layer of pulled.layers) expect(await store.has(layer.digest)).toBe(true);
    expect(await store.has(digest)).toBe(true);
    expect([...phases].sort()).toEqual(['config', 'layer', 'manifest']);
  });

  it('fetches nothing again on a second pull by tag, and nothing at all on a pull by a stored digest', async () => {
    const reg = await start();
    const digest = reg.addImage('team/tools', '1.2', makeImage());
    await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base);
    const before = reg.requests.length;
    await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base);
    expect(reg.requests.slice(before).map((r) => r.url)).toEqual([`/v2/team/tools/manifests/1.2`]);

    const again = reg.requests.length;
    const pulled = await pullImage(parseReference(`${reg.host}/team/tools@${digest}`), store, base);
    expect(pulled.digest).toBe(digest);
    expect(reg.requests.length).toBe(again);
  });

  it('pulls by digest from the network and rejects a manifest that does not hash to it', async () => {
    const reg = await start();
    const image = makeImage();
    const digest = reg.addImage('team/tools', '1.2', image);
    const pulled = await pullImage(parseReference(`${reg.host}/team/tools@${digest}`), store, base);
    expect(pulled.reference).toBe(`${reg.host}/team/tools@${digest}`);

    const other = makeImage('arm64');
    reg.manifests.set(`team/tools:${digest.replace(/.$/, '0')}`, other.manifest);
    const err = await rejection(
      pullImage(parseReference(`${reg.host}/team/tools@${digest.replace(/.$/, '0')}`), new BlobStore(path.join(root, 'b2')), base),
    );
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
  });

  it('rejects a manifest whose Docker-Content-Digest disagrees with its bytes', async () => {
    const reg = await start();
    reg.addImage('team/tools', '1.2', makeImage());
    reg.sendDigestHeader = `sha256:${'0'.repeat(64)}`;
    const err = await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
  });

  it('resolves an index to the requested platform, and fails with UNSUPPORTED when it has none', async () => {
    const reg = await start();
    const amd = makeImage('amd64');
    const arm = makeImage('arm64');
    const index = Buffer.from(
      JSON.stringify({
        schemaVersion: 2,
        mediaType: MEDIA_TYPES.ociIndex,
        manifests: [
          {
            mediaType: MEDIA_TYPES.ociManifest,
            digest: reg.addImage('multi', 'amd', amd),
            size: amd.manifest.bytes.length,
            platform: { os: 'linux', architecture: 'amd64' },
          },
          {
            mediaType: MEDIA_TYPES.ociManifest,
            digest: reg.addImage('multi', 'arm', arm),
            size: arm.manifest.bytes.length,
            platform: { os: 'linux', architecture: 'arm64', variant: 'v8' },
          },
        ],
      }),
    );
    reg.manifests.set('multi:latest', { bytes: index, mediaType: MEDIA_TYPES.ociIndex });

    const onArm = await pullImage(parseReference(`${reg.host}/multi`), store, {
      ...base,
      platform: { os: 'linux', architecture: 'arm64' },
    });
    expect(onArm.config.architecture).toBe('arm64');
    expect(onArm.digest).toBe(sha256Digest(arm.manifest.bytes));
    expect(await store.has(sha256Digest(index))).toBe(true);
    expect(reg.blobGets()).not.toContain(sha256Digest(amd.layers[0] as Buffer));

    const err = await rejection(
      pullImage(parseReference(`${reg.host}/multi`), store, { ...base, platform: { os: 'linux', architecture: 's390x' } }),
    );
    expect(isAegisError(err, 'UNSUPPORTED')).toBe(true);
    expect(err.message).toContain('linux/amd64, linux/arm64/v8');
  });

  it('answers a Bearer challenge with a token fetched using the Docker config credentials', async () => {
    const reg = await start({ auth: 'bearer', user: 'alice', password: 's3cret' });
    reg.addImage('team/tools', '1.2', makeImage());
    const config = path.join(root, 'config.json');
    fs.writeFileSync(
      config,
      JSON.stringify({ auths: { [`http://${reg.host}`]: { auth: Buffer.from('alice:s3cret').toString('base64') } } }),
    );
    const pulled = await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, { ...base, dockerConfigPath: config });
    expect(pulled.layers).toHaveLength(2);
    const tokenRequests = reg.requests.filter((r) => r.url === '/token');
    expect(tokenRequests.length).toBeGreaterThanOrEqual(1);
    expect(reg.blobGets().length).toBe(3);
    expect(
      reg.requests.filter((r) => r.url.includes('/blobs/')).every((r) => r.authorization === 'Bearer tok-for-repository:team/tools:pull'),
    ).toBe(true);
  });

  it('fails with FAILED_PRECONDITION, without echoing secrets, when the token service refuses the credentials', async () => {
    const reg = await start({ auth: 'bearer', user: 'alice', password: 's3cret' });
    reg.addImage('team/tools', '1.2', makeImage());
    const err = await rejection(
      pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, {
        ...base,
        credentials: { username: 'alice', password: 'wrong-pass' },
      }),
    );
    expect(isAegisError(err, 'FAILED_PRECONDITION')).toBe(true);
    expect(err.message).toContain('log in');
    expect(err.message).not.toContain('wrong-pass');

    const anonymous = await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    expect(isAegisError(anonymous, 'FAILED_PRECONDITION')).toBe(true);
  });

  it('answers a Basic challenge with credentials, and asks for them without', async () => {
    const reg = await start({ auth: 'basic', user: 'bob', password: 'pw' });
    reg.addImage('team/tools', '1.2', makeImage());
    const err = await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    expect(isAegisError(err, 'FAILED_PRECONDITION')).toBe(true);
    const pulled = await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, {
      ...base,
      credentials: { username: 'bob', password: 'pw' },
    });
    expect(pulled.layers).toHaveLength(2);
  });

  it('resumes a layer cut off mid-transfer with a Range request', async () => {
    const reg = await start();
    const image = makeImage();
    reg.addImage('team/tools', '1.2', image);
    const big = sha256Digest(image.layers[0] as Buffer);
    reg.cutAfter.set(big, 20_000);
    const err = await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    expect(isAegisError(err, 'UNAVAILABLE')).toBe(true);
    expect(await store.has(big)).toBe(false);

    await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base);
    const ranged = reg.requests.filter((r) => r.url.endsWith(big) && r.range);
    expect(ranged).toHaveLength(1);
    expect(ranged[0]?.range).toMatch(/^bytes=\d+-$/);
    expect(Number(/\d+/.exec(ranged[0]?.range ?? '')?.[0])).toBeGreaterThan(0);
    expect(fs.readFileSync(store.path(big)).equals(image.layers[0] as Buffer)).toBe(true);
  });

  it('still completes a resumed layer when the server ignores Range and sends it whole', async () => {
    const reg = await start();
    const image = makeImage();
    reg.addImage('team/tools', '1.2', image);
    const big = sha256Digest(image.layers[0] as Buffer);
    reg.cutAfter.set(big, 20_000);
    await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    reg.ignoreRange = true;
    await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base);
    expect(fs.readFileSync(store.path(big)).equals(image.layers[0] as Buffer)).toBe(true);
  });

  it('rejects a corrupt blob with INVALID_ARGUMENT and stores nothing for it', async () => {
    const reg = await start();
    const image = makeImage();
    reg.addImage('team/tools', '1.2', image);
    const small = sha256Digest(image.layers[1] as Buffer);
    const corrupt = Buffer.from(image.layers[1] as Buffer);
    corrupt[100] = (corrupt[100] ?? 0) ^ 0xff;
    reg.blobs.set(small, corrupt);
    const err = await rejection(pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base));
    expect(isAegisError(err, 'INVALID_ARGUMENT')).toBe(true);
    expect(err.message).toContain(small);
    expect(await store.has(small)).toBe(false);
    expect(fs.existsSync(path.join(root, 'blobs', 'partial', small.slice(7)))).toBe(false);
  });

  it('reports an unknown tag or repository as NOT_FOUND', async () => {
    const reg = await start();
    reg.addImage('team/tools', '1.2', makeImage());
    const tag = await rejection(pullImage(parseReference(`${reg.host}/team/tools:9.9`), store, base));
    expect(isAegisError(tag, 'NOT_FOUND')).toBe(true);
    expect(tag.message).toContain('MANIFEST_UNKNOWN');
    const repo = await rejection(pullImage(parseReference(`${reg.host}/team/nothing`), store, base));
    expect(isAegisError(repo, 'NOT_FOUND')).toBe(true);
  });

  it('refuses zstd layers as UNSUPPORTED before downloading anything', async () => {
    const reg = await start();
    reg.addImage('team/zstd', '1', makeImage('amd64', [100], 'application/vnd.oci.image.layer.v1.tar+zstd'));
    const err = await rejection(pullImage(parseReference(`${reg.host}/team/zstd:1`), store, base));
    expect(isAegisError(err, 'UNSUPPORTED')).toBe(true);
    expect(err.message).toContain('zstd');
    expect(reg.blobGets()).toEqual([]);
  });

  it('stops with CANCELLED when aborted, and leaves the partial layer for the next pull', async () => {
    const reg = await start();
    const image = makeImage('amd64', [400_000]);
    reg.addImage('team/tools', '1.2', image);
    const layer = sha256Digest(image.layers[0] as Buffer);
    const ac = new AbortController();
    const err = await rejection(
      pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, {
        ...base,
        signal: ac.signal,
        onProgress: (p) => {
          if (p.phase === 'layer' && p.doneBytes > 0) ac.abort();
        },
      }),
    );
    expect(isAegisError(err, 'CANCELLED')).toBe(true);
    expect(fs.statSync(path.join(root, 'blobs', 'partial', layer.slice(7))).size).toBeGreaterThan(0);
    await pullImage(parseReference(`${reg.host}/team/tools:1.2`), store, base);
    expect(reg.requests.filter((r) => r.url.endsWith(layer) && r.range)).toHaveLength(1);
  });

  it('downloads each blob once when the same image is pulled twice at the same time', async () => {
    const reg = await start();
    reg.addImage('team/tools', '1.2', makeImage());
    const ref = parseReference(`${reg.host}/team/tools:1.2`);
    await Promise.all([pullImage(ref, store, base), pullImage(ref, store, base)]);
    const gets = reg.blobGets();
    expect(new Set(gets).size).toBe(gets.length);
  });

  it('reports a registry that is not listening as UNAVAILABLE', async () => {
    const reg = await start();
    const host = reg.host;
    await reg.stop();
    registry = new StubRegistry();
    await registry.start();
    const err = await rejection(pullImage(parseReference(`${host}/team/tools:1.2`), store, base));
    expect(isAegisError(err, 'UNAVAILABLE')).toBe(true);
  });

  it('uses https for remote registries and http only for loopback or insecureRegistries', async () => {
    await start();
    const urls: string[] = [];
    const recording = (async (url: string | URL | Request) => {
      urls.push(String(url));
      throw new TypeError('fetch failed');
    }) as typeof fetch;
    await rejection(pullImage(parseReference('registry.example:5000/a/b'), store, { ...base, fetch: recording }));
    await rejection(
      pullImage(parseReference('registry.example:5000/a/b'), store, {
        ...base,
        fetch: recording,
        insecureRegistries: ['registry.example:5000'],
      }),
    );
    await rejection(pullImage(parseReference('alpine'), store, { ...base, fetch: recording }));
    expect(urls).toEqual([
      'https://registry.example:5000/v2/a/b/manifests/latest',
      'http://registry.example:5000/v2/a/b/manifests/latest',
      'https://registry-1.docker.io/v2/library/alpine/manifests/latest',
    ]);
  });
});

describe('documents', () => {
  it('parses a WWW-Authenticate challenge with quoted and bare values', () => {
    expect(
      parseChallenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull"'),
    ).toEqual({
      scheme: 'bearer',
      params: { realm: 'https://auth.docker.io/token', service: 'registry.docker.io', scope: 'repository:library/alpine:pull' },
    });
    expect(parseChallenge('Basic realm=stub')).toEqual({ scheme: 'basic', params: { realm: 'stub' } });
  });

  it('parses image configs strictly', () => {
    const good = { architecture: 'arm64', os: 'linux', config: { Env: null, Cmd: ['sh'] }, rootfs: { type: 'layers', diff_ids: [] } };
    expect(parseImageConfig(Buffer.from(JSON.stringify(good)))).toEqual({
      env: [],
      cmd: ['sh'],
      architecture: 'arm64',
      os: 'linux',
      diffIds: [],
    });
    for (const bad of [
      { ...good, architecture: 5 },
      { ...good, config: { Env: 'PATH=/bin' } },
      { ...good, config: { Cmd: ['a\0b'] } },
      { ...good, rootfs: { type: 'layers', diff_ids: ['md5:x'] } },
      { ...good, rootfs: undefined },
      [],
    ]) {
      expect(() => parseImageConfig(Buffer.from(JSON.stringify(bad)))).toThrow();
    }
    expect(() => parseImageConfig(Buffer.alloc(5 * 1024 * 1024, 0x20))).toThrow(/exceeds 4 MiB, the limit per document/);
  });

  it('prefers the exact arm64 variant, and an entry without a variant over a mismatched one', () => {
    const d = (architecture: string, variant?: string) => ({
      mediaType: MEDIA_TYPES.ociManifest,
      digest: `sha256:${(architecture + (variant ?? '')).padEnd(64, '0').replace(/[^0-9a-f]/g, 'a')}`,
      size: 1,
      platform: variant ? { os: 'linux', architecture, variant } : { os: 'linux', architecture },
    });
    const index = {
      kind: 'index' as const,
      mediaType: MEDIA_TYPES.ociIndex,
      manifests: [d('arm', 'v7'), d('arm64'), d('amd64', 'v3'), d('amd64')],
    };
    expect(selectManifest(index, { os: 'linux', architecture: 'arm64' }, 'x').platform).toEqual({ os: 'linux', architecture: 'arm64' });
    expect(selectManifest(index, { os: 'linux', architecture: 'amd64' }, 'x').platform).toEqual({ os: 'linux', architecture: 'amd64' });
  });
});
