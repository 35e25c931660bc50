/**
 * Test images built from Debian packages, as OCI image layouts on disk, for tests that need a
 * real image without pulling one from a registry. Only the Debian archive is contacted (through
 * apt, as guest/rootfs/build.sh does); nothing needs root. Every layer is written with explicit
 * tar headers, so the files are root-owned in the image whoever built it.
 *
 * Images are cached under `cacheDir` by a key over their recipe and this file, so a rerun costs
 * nothing and a change here rebuilds them.
 */
import { execFile } from 'node:child_process';
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { createWriteStream, existsSync, promises as fs, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { Readable, Transform, type TransformCallback } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { createGzip } from 'node:zlib';

const execFileP = promisify(execFile);
const ROOT = fileURLToPath(new URL('../..', import.meta.url));
// The daemon's own tar-stream: the root package does not depend on one.
const tar = createRequire(path.join(ROOT, 'packages/daemon/package.json'))('tar-stream') as TarStream;
// This file by its path, not import.meta.url: the bench runs a bundled copy and must hit the same cache.
const SOURCE_KEY = createHash('sha256')
  .update(readFileSync(path.join(ROOT, 'tests/support/oci-images.ts')))
  .digest('hex');

interface TarStream {
  pack(): TarPack;
}
interface TarPack extends AsyncIterable<Uint8Array> {
  entry(header: TarHeader, data: Buffer, callback: (err?: Error | null) => void): unknown;
  finalize(): void;
}
interface TarHeader {
  name: string;
  type: 'file' | 'directory' | 'symlink' | 'link';
  mode: number;
  uid: number;
  gid: number;
  uname: string;
  gname: string;
  mtime: Date;
  size: number;
  linkname?: string;
}

export const MEDIA_TYPES = {
  layout: '1.0.0',
  index: 'application/vnd.oci.image.index.v1+json',
  manifest: 'application/vnd.oci.image.manifest.v1+json',
  config: 'application/vnd.oci.image.config.v1+json',
  layerGzip: 'application/vnd.oci.image.layer.v1.tar+gzip',
} as const;

const REF_ANNOTATION = 'org.opencontainers.image.ref.name';

/** An image in an OCI image layout; `ref` is its `org.opencontainers.image.ref.name`. */
export interface TestImage {
  layoutDir: string;
  ref: string;
}

/** What the glibc image's upper layer does to its lower one, for tests to check. */
export const GLIBC_IMAGE = {
  packages: ['python3', 'python3-numpy', 'bash', 'coreutils'],
  refs: { root: 'python', user: 'python-user' },
  /** Present in the lower layer, deleted by a whiteout in the upper. */
  whitedOut: '/opt/fixture/deleted.txt',
  /** A sibling of `whitedOut` nothing touches. */
  kept: '/opt/fixture/kept.txt',
  /** Opaque in the upper layer: holds `opaqueNew` only, not the lower layer's `old.txt`. */
  opaqueDir: '/opt/fixture/opaque',
  opaqueNew: 'new.txt',
  /** uid 1000, gid 1000, mode 0640. */
  ownedFile: '/home/app/secret.txt',
  /** The image's own CA bundle (one self-signed certificate of its own, CN "image's own CA"). */
  caBundle: '/etc/ssl/certs/ca-certificates.crt',
  /** Symlink to /usr/bin/python3, in the upper layer. */
  symlink: '/usr/local/bin/py',
  /** Hard link in the upper layer to `hardlinkTarget` in the lower layer. */
  hardlink: '/usr/local/bin/python3-hardlink',
  hardlinkTarget: '/usr/bin/python3.11',
  user: { name: 'app', uid: 1000, gid: 1000, home: '/home/app' },
} as const;

export const STATIC_IMAGE = {
  packages: ['busybox-static'],
  ref: 'static',
  entrypoint: ['/bin/busybox'],
  cmd: ['echo', 'hello from a static image'],
} as const;

export function testImagesCacheDir(): string {
  return path.join(process.env['AEGIS_HOME'] ?? path.join(os.homedir(), '.aegis'), 'cache/test-images');
}

/**
 * A glibc image with python3 and numpy (about 130 MiB unpacked) in two layers: Debian's packages
 * below, and above them a layer with a whiteout, an opaque directory, a symlink, a hard link into
 * the lower layer, a file owned by uid 1000 with mode 0640 and an `app` user. Two refs share the
 * layers: `python` runs as root, `python-user` as `app`.
 */
export async function buildGlibcImage(cacheDir = testImagesCacheDir(), options: { user?: boolean } = {}): Promise<TestImage> {
  const layoutDir = await cached(cacheDir, 'glibc', GLIBC_IMAGE, async (dir) => {
    const tree = await unpackPackages(cacheDir, GLIBC_IMAGE.packages, path.join(dir, 'tree'));
    const mtime = new Date('2024-01-01T00:00:00Z');
    await fs.writeFile(
      path.join(tree, 'etc/passwd'),
      'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n',
    );
    await fs.writeFile(path.join(tree, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
    await fs.mkdir(path.join(tree, 'opt/fixture/opaque'), { recursive: true });
    await fs.writeFile(path.join(tree, 'opt/fixture/deleted.txt'), 'the upper layer deletes this\n');
    await fs.writeFile(path.join(tree, 'opt/fixture/kept.txt'), 'the upper layer keeps this\n');
    await fs.writeFile(path.join(tree, 'opt/fixture/opaque/old.txt'), 'the opaque directory hides this\n');
    if (!existsSync(path.join(tree, 'bin/sh'))) await fs.symlink('bash', path.join(tree, 'bin/sh'));
    for (const d of ['proc', 'sys', 'dev', 'run', 'root', 'home', 'tmp', 'var/tmp'])
      await fs.mkdir(path.join(tree, d), { recursive: true });
    await fs.chmod(path.join(tree, 'tmp'), 0o1777);
    await fs.chmod(path.join(tree, 'var/tmp'), 0o1777);
    await fs.chmod(path.join(tree, 'root'), 0o700);
    const lower = await writeLayer(dir, walkTree(tree));

    const { user } = GLIBC_IMAGE;
    const dirEntry = (name: string, extra: Partial<LayerEntry> = {}): LayerEntry => ({
      name,
      type: 'directory',
      mode: 0o755,
      mtime,
      ...extra,
    });
    const ownCa = await selfSignedPem("image's own CA");
    const upper = await writeLayer(dir, [
      dirEntry('etc/'),
      dirEntry('etc/ssl/'),
      dirEntry('etc/ssl/certs/'),
      file('etc/ssl/certs/ca-certificates.crt', ownCa, mtime),
      file('etc/group', `root:x:0:\nnogroup:x:65534:\n${user.name}:x:${user.gid}:\n`, mtime),
      file(
        'etc/passwd',
        `root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n${user.name}:x:${user.uid}:${user.gid}::${user.home}:/bin/bash\n`,
        mtime,
      ),
      dirEntry('home/'),
      dirEntry('home/app/', { uid: user.uid, gid: user.gid }),
      file('home/app/secret.txt', 'only app may read this\n', mtime, { uid: user.uid, gid: user.gid, mode: 0o640 }),
      dirEntry('opt/'),
      dirEntry('opt/fixture/'),
      file('opt/fixture/.wh.deleted.txt', '', mtime),
      dirEntry('opt/fixture/opaque/'),
      file('opt/fixture/opaque/.wh..wh..opq', '', mtime),
      file('opt/fixture/opaque/new.txt', 'the only file left in the opaque directory\n', mtime),
      dirEntry('usr/'),
      dirEntry('usr/local/'),
      dirEntry('usr/local/bin/'),
      { name: 'usr/local/bin/py', type: 'symlink', linkname: '/usr/bin/python3', mode: 0o777, mtime },
      { name: 'usr/local/bin/python3-hardlink', type: 'link', linkname: 'usr/bin/python3.11', mode: 0o755, mtime },
    ]);
    const env = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'LANG=C.UTF-8', 'PYTHONDONTWRITEBYTECODE=1'];
    return [
      await writeImage(dir, GLIBC_IMAGE.refs.root, [lower, upper], { Env: env, WorkingDir: '/', Cmd: ['python3'] }),
      await writeImage(dir, GLIBC_IMAGE.refs.user, [lower, upper], { Env: env, WorkingDir: user.home, Cmd: ['python3'], User: user.name }),
    ];
  });
  return { layoutDir, ref: options.user ? GLIBC_IMAGE.refs.user : GLIBC_IMAGE.refs.root };
}

/** A throwaway self-signed certificate (PEM), made with openssl. */
async function selfSignedPem(cn: string): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-ca-'));
  try {
    await execFileP('openssl', [
      'req',
      '-x509',
      '-newkey',
      'ec',
      '-pkeyopt',
      'ec_paramgen_curve:P-256',
      '-nodes',
      '-days',
      '3650',
      '-subj',
      `/CN=${cn}`,
      '-keyout',
      path.join(dir, 'key.pem'),
      '-out',
      path.join(dir, 'cert.pem'),
    ]);
    return await fs.readFile(path.join(dir, 'cert.pem'), 'utf8');
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** An image with one statically linked busybox and two of its applets as symlinks: no libc, no shell. */
export async function buildStaticImage(cacheDir = testImagesCacheDir()): Promise<TestImage> {
  const layoutDir = await cached(cacheDir, 'static', STATIC_IMAGE, async (dir) => {
    const tree = await unpackPackages(cacheDir, STATIC_IMAGE.packages, path.join(dir, 'tree'));
    const mtime = new Date('2024-01-01T00:00:00Z');
    const busybox = await fs.readFile(path.join(tree, 'bin/busybox'));
    const layer = await writeLayer(dir, [
      { name: 'bin/', type: 'directory', mode: 0o755, mtime },
      { name: 'bin/busybox', type: 'file', mode: 0o755, mtime, data: busybox },
      { name: 'bin/echo', type: 'symlink', linkname: 'busybox', mode: 0o777, mtime },
      { name: 'bin/cat', type: 'symlink', linkname: '/bin/busybox', mode: 0o777, mtime },
      { name: 'tmp/', type: 'directory', mode: 0o1777, mtime },
    ]);
    return [
      await writeImage(dir, STATIC_IMAGE.ref, [layer], {
        Entrypoint: [...STATIC_IMAGE.entrypoint],
        Cmd: [...STATIC_IMAGE.cmd],
        WorkingDir: '/',
      }),
    ];
  });
  return { layoutDir, ref: STATIC_IMAGE.ref };
}

/** Writes `ref` from the layout as a `docker save`-style archive named `dockerRef`. */
export async function exportDockerArchive(
  layoutDir: string,
  ref: string,
  outTar: string,
  dockerRef = `aegis-test/${ref}:latest`,
): Promise<void> {
  await fs.rm(outTar, { force: true });
  // --insecure-policy: both ends are local files; a host without /etc/containers/policy.json would refuse otherwise.
  await execFileP('skopeo', ['--insecure-policy', 'copy', '-q', `oci:${layoutDir}:${ref}`, `docker-archive:${outTar}:${dockerRef}`], {
    maxBuffer: 16 << 20,
  });
}

/** The layer blobs of `ref`, lowest first, as buildImageFilesystem takes them. */
export async function imageLayers(layoutDir: string, ref: string): Promise<{ path: string; mediaType: string }[]> {
  const manifest = await readManifest(layoutDir, ref);
  return manifest.layers.map((l) => ({ path: blobPath(layoutDir, l.digest), mediaType: l.mediaType }));
}

/** The image config (`config` member of the config blob) of `ref`. */
export async function imageConfig(layoutDir: string, ref: string): Promise<ImageConfig> {
  const manifest = await readManifest(layoutDir, ref);
  const doc = JSON.parse(await fs.readFile(blobPath(layoutDir, manifest.config.digest), 'utf8')) as { config: ImageConfig };
  return doc.config;
}

export interface ImageConfig {
  Env?: string[];
  WorkingDir?: string;
  Entrypoint?: string[];
  Cmd?: string[];
  User?: string;
}

interface Descriptor {
  mediaType: string;
  digest: string;
  size: number;
  annotations?: Record<string, string>;
}

async function readManifest(layoutDir: string, ref: string): Promise<{ config: Descriptor; layers: Descriptor[] }> {
  const index = JSON.parse(await fs.readFile(path.join(layoutDir, 'index.json'), 'utf8')) as { manifests: Descriptor[] };
  const desc = index.manifests.find((m) => m.annotations?.[REF_ANNOTATION] === ref);
  if (!desc) throw new Error(`${layoutDir} has no image named ${ref}`);
  return JSON.parse(await fs.readFile(blobPath(layoutDir, desc.digest), 'utf8')) as { config: Descriptor; layers: Descriptor[] };
}

function blobPath(layoutDir: string, digest: string): string {
  return path.join(layoutDir, 'blobs', ...digest.split(':'));
}

// ---- building ----------------------------------------------------------------------------------

const building = new Map<string, Promise<string>>();

/**
 * The layout at `<cacheDir>/<name>-<key>`, made by `make` in a scratch directory and renamed into
 * place whole, so a concurrent or interrupted build never leaves a half-written layout behind.
 */
async function cached(cacheDir: string, name: string, recipe: object, make: (dir: string) => Promise<Descriptor[]>): Promise<string> {
  const key = createHash('sha256')
    .update(JSON.stringify({ recipe, arch: await debianArch(), source: SOURCE_KEY }))
    .digest('hex')
    .slice(0, 16);
  const layoutDir = path.join(cacheDir, `${name}-${key}`);
  const running = building.get(layoutDir);
  if (running) return running;
  const work = (async () => {
    if (existsSync(path.join(layoutDir, 'index.json'))) return layoutDir;
    await fs.mkdir(cacheDir, { recursive: true });
    const dir = await fs.mkdtemp(path.join(cacheDir, `.${name}-`));
    try {
      await fs.mkdir(path.join(dir, 'blobs/sha256'), { recursive: true });
      const manifests = await make(dir);
      await fs.rm(path.join(dir, 'tree'), { recursive: true, force: true });
      await fs.writeFile(path.join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: MEDIA_TYPES.layout }));
      await fs.writeFile(path.join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, mediaType: MEDIA_TYPES.index, manifests }));
      await fs.rename(dir, layoutDir).catch(async (err: NodeJS.ErrnoException) => {
        // Another process finished the same build first; its layout is as good as ours.
        if (err.code !== 'ENOTEMPTY' && err.code !== 'EEXIST') throw err;
      });
      // Layouts from older recipes are dead weight (about 50 MiB each for the glibc image).
      for (const old of await fs.readdir(cacheDir)) {
        if (old.startsWith(`${name}-`) && old !== path.basename(layoutDir))
          await fs.rm(path.join(cacheDir, old), { recursive: true, force: true });
      }
      return layoutDir;
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  })();
  building.set(layoutDir, work);
  work.catch(() => building.delete(layoutDir));
  return work;
}

let arch: Promise<string> | undefined;
function debianArch(): Promise<string> {
  arch ??= execFileP('dpkg', ['--print-architecture']).then((r) => r.stdout.trim());
  return arch;
}

/** Downloads the packages' closure (cached by the package list) and unpacks it into `tree`. */
async function unpackPackages(cacheDir: string, packages: readonly string[], tree: string): Promise<string> {
  const key = createHash('sha256')
    .update(JSON.stringify({ packages, arch: await debianArch() }))
    .digest('hex')
    .slice(0, 16);
  const debs = path.join(cacheDir, `debs-${key}`);
  if (!existsSync(path.join(debs, '.complete'))) {
    await fs.mkdir(path.join(debs, 'partial'), { recursive: true });
    const status = path.join(debs, 'status');
    // An empty dpkg status makes apt resolve the whole closure, as for an empty system.
    await fs.writeFile(status, '');
    try {
      await execFileP(
        'apt-get',
        [
          '-q',
          '-o',
          `Dir::State::status=${status}`,
          '-o',
          `Dir::Cache::archives=${debs}`,
          '-o',
          'Debug::NoLocking=1',
          '-o',
          'APT::Install-Recommends=false',
          '--download-only',
          '-y',
          'install',
          ...packages,
        ],
        { maxBuffer: 16 << 20 },
      );
    } catch (err) {
      throw new Error(
        `apt-get could not download ${packages.join(' ')} (has \`apt-get update\` run?): ${(err as { stderr?: string }).stderr ?? err}`,
      );
    }
    await fs.writeFile(path.join(debs, '.complete'), '');
  }
  await fs.mkdir(tree, { recursive: true });
  const files = (await fs.readdir(debs)).filter((f) => f.endsWith('.deb')).sort();
  for (const deb of files) await execFileP('dpkg-deb', ['-x', path.join(debs, deb), tree]);
  return tree;
}

interface LayerEntry {
  name: string;
  type: TarHeader['type'];
  mode: number;
  mtime: Date;
  uid?: number;
  gid?: number;
  linkname?: string;
  data?: Buffer;
}

function file(name: string, content: string, mtime: Date, extra: Partial<LayerEntry> = {}): LayerEntry {
  return { name, type: 'file', mode: 0o644, mtime, data: Buffer.from(content), ...extra };
}

/** The entries of a host tree in sorted order, owned by root in the layer whatever they are on the host. */
async function* walkTree(root: string): AsyncGenerator<LayerEntry> {
  const firstName = new Map<number, string>();
  async function* visit(rel: string): AsyncGenerator<LayerEntry> {
    const names = (await fs.readdir(path.join(root, rel))).sort();
    for (const name of names) {
      const relPath = rel ? `${rel}/${name}` : name;
      const abs = path.join(root, relPath);
      const st = await fs.lstat(abs);
      const base = { mode: st.mode & 0o7777, mtime: new Date(Math.floor(st.mtimeMs / 1000) * 1000) };
      if (st.isDirectory()) {
        yield { name: `${relPath}/`, type: 'directory', ...base };
        yield* visit(relPath);
      } else if (st.isSymbolicLink()) {
        yield { name: relPath, type: 'symlink', linkname: await fs.readlink(abs), ...base };
      } else if (st.isFile()) {
        const first = st.nlink > 1 ? firstName.get(st.ino) : undefined;
        if (first !== undefined) {
          yield { name: relPath, type: 'link', linkname: first, ...base };
        } else {
          if (st.nlink > 1) firstName.set(st.ino, relPath);
          yield { name: relPath, type: 'file', data: await fs.readFile(abs), ...base };
        }
      }
    }
  }
  yield* visit('');
}

class HashTap extends Transform {
  bytes = 0;
  constructor(readonly hash: Hash) {
    super();
  }
  override _transform(chunk: Buffer, _encoding: BufferEncoding, done: TransformCallback): void {
    this.hash.update(chunk);
    this.bytes += chunk.length;
    done(null, chunk);
  }
}

interface WrittenLayer {
  descriptor: Descriptor;
  diffId: string;
}

/** A gzipped tar layer blob in `dir`'s blob store, from entries with explicit root-owned headers. */
async function writeLayer(dir: string, entries: Iterable<LayerEntry> | AsyncIterable<LayerEntry>): Promise<WrittenLayer> {
  const pack = tar.pack();
  const diff = new HashTap(createHash('sha256'));
  const compressed = new HashTap(createHash('sha256'));
  const tmp = path.join(dir, 'blobs', `.layer-${randomBytes(6).toString('hex')}`);
  const writing = pipeline(Readable.from(pack), diff, createGzip(), compressed, createWriteStream(tmp));
  writing.catch(() => undefined);
  for await (const e of entries) {
    const data = e.data ?? Buffer.alloc(0);
    const header: TarHeader = {
      name: e.name,
      type: e.type,
      mode: e.mode,
      uid: e.uid ?? 0,
      gid: e.gid ?? 0,
      uname: e.uid ? '' : 'root',
      gname: e.gid ? '' : 'root',
      mtime: e.mtime,
      size: data.length,
      ...(e.linkname !== undefined ? { linkname: e.linkname } : {}),
    };
    await new Promise<void>((resolve, reject) => pack.entry(header, data, (err) => (err ? reject(err) : resolve())));
  }
  pack.finalize();
  await writing;
  const hex = compressed.hash.digest('hex');
  await fs.rename(tmp, path.join(dir, 'blobs/sha256', hex));
  return {
    descriptor: { mediaType: MEDIA_TYPES.layerGzip, digest: `sha256:${hex}`, size: compressed.bytes },
    diffId: `sha256:${diff.hash.digest('hex')}`,
  };
}

async function writeBlob(dir: string, mediaType: string, doc: object, annotations?: Record<string, string>): Promise<Descriptor> {
  const bytes = Buffer.from(JSON.stringify(doc));
  const hex = createHash('sha256').update(bytes).digest('hex');
  await fs.writeFile(path.join(dir, 'blobs/sha256', hex), bytes);
  return { mediaType, digest: `sha256:${hex}`, size: bytes.length, ...(annotations ? { annotations } : {}) };
}

async function writeImage(dir: string, ref: string, layers: WrittenLayer[], config: ImageConfig): Promise<Descriptor> {
  const created = '2024-01-01T00:00:00Z';
  const configDesc = await writeBlob(dir, MEDIA_TYPES.config, {
    created,
    architecture: (await debianArch()) === 'arm64' ? 'arm64' : 'amd64',
    os: 'linux',
    config,
    rootfs: { type: 'layers', diff_ids: layers.map((l) => l.diffId) },
    history: layers.map(() => ({ created, created_by: 'tests/support/oci-images.ts' })),
  });
  const manifest = { schemaVersion: 2, mediaType: MEDIA_TYPES.manifest, config: configDesc, layers: layers.map((l) => l.descriptor) };
  return writeBlob(dir, MEDIA_TYPES.manifest, manifest, { [REF_ANNOTATION]: ref });
}
