import { execFileSync, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { promises as fs, createWriteStream, existsSync, readFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { pipeline } from 'node:stream/promises';
import { createGzip, gzipSync } from 'node:zlib';
import * as tar from 'tar-stream';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { isAegisError } from '@aegis/protocol';
import { rejection } from '../../../../tests/support/rejection.js';
import { bombLayer } from '../../../../tests/support/import-bomb.js';
import { ContentStore } from './content-store.js';
import { LayerTree } from './layer-tree.js';
import { buildImageFilesystem, type LayerFile } from './layers.js';
import type { ImageLimits } from './limits.js';

type Entry = Partial<tar.Header> & { name: string; content?: string | Buffer };

const TAR = 'application/vnd.oci.image.layer.v1.tar';
const TAR_GZIP = 'application/vnd.oci.image.layer.v1.tar+gzip';
const MTIME = new Date('2021-03-04T05:06:07Z');
const ENV = { ...process.env, PATH: `${process.env['PATH'] ?? ''}:/usr/sbin:/sbin` };

let tmp: string;
let counter = 0;

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-layers-'));
});

afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

/** A layer file made with tar-stream, with the headers exactly as given (root-owned unless said). */
async function layer(entries: Entry[], gzip = false): Promise<LayerFile> {
  const pack = tar.pack();
  const collected = (async () => {
    const chunks: Buffer[] = [];
    for await (const c of pack) chunks.push(c as Buffer);
    return Buffer.concat(chunks);
  })();
  for (const { content, ...header } of entries) {
    const type = header.type ?? 'file';
    const data = content === undefined ? undefined : Buffer.from(content);
    await new Promise<void>((resolve, reject) => {
      const h = { uid: 0, gid: 0, mode: type === 'directory' ? 0o755 : 0o644, mtime: MTIME, ...header, type, size: data?.length ?? 0 };
      pack.entry(h, data ?? Buffer.alloc(0), (err) => (err ? reject(err) : resolve()));
    });
  }
  pack.finalize();
  const bytes = await collected;
  const file = path.join(tmp, `layer-${counter++}.tar${gzip ? '.gz' : ''}`);
  await fs.writeFile(file, gzip ? gzipSync(bytes) : bytes);
  return { path: file, mediaType: gzip ? TAR_GZIP : TAR };
}

async function build(layers: LayerFile[]): Promise<string> {
  const out = path.join(tmp, `image-${counter++}.ext4`);
  await buildImageFilesystem(layers, out);
  return out;
}

function debugfs(image: string, command: string): string {
  return execFileSync('debugfs', ['-R', command, image], { env: ENV, stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 << 20 }).toString(
    'latin1',
  );
}

function quote(p: string): string {
  return `"${p.replaceAll('"', '""')}"`;
}

interface Stat {
  type: string;
  mode: number;
  uid: number;
  gid: number;
  links: number;
  size: number;
  mtime: number;
  device?: string;
}

function stat(image: string, p: string): Stat | undefined {
  const out = debugfs(image, `stat ${quote(p)}`);
  const m = /Type: (.+?)\s+Mode:\s+(\d+)/.exec(out);
  if (!m) return undefined;
  const num = (re: RegExp): number => Number(re.exec(out)?.[1] ?? NaN);
  const device = /Device major\/minor number: ([0-9a-f]+:[0-9a-f]+)/.exec(out)?.[1];
  return {
    type: m[1]!,
    mode: parseInt(m[2]!, 8),
    uid: num(/User:\s+(\d+)/),
    gid: num(/Group:\s+(\d+)/),
    links: num(/Links: (\d+)/),
    size: num(/Size: (\d+)/),
    mtime: parseInt(/ mtime: 0x([0-9a-f]+)/.exec(out)?.[1] ?? 'NaN', 16),
    ...(device ? { device } : {}),
  };
}

function ls(image: string, dir: string): string[] {
  // `ls -p` prints /inode/mode/uid/gid/name/size/ per entry.
  return debugfs(image, `ls -p ${quote(dir)}`)
    .split('\n')
    .map((l) => l.split('/'))
    .filter((f) => f.length >= 7 && f[5] !== '.' && f[5] !== '..')
    .map((f) => f.slice(5, -2).join('/'))
    .sort();
}

function cat(image: string, p: string): string {
  return debugfs(image, `cat ${quote(p)}`);
}

function inodeOf(image: string, p: string): number {
  return Number(/Inode: (\d+)/.exec(debugfs(image, `stat ${quote(p)}`))?.[1]);
}

async function expectCode(promise: Promise<unknown>, code: string): Promise<void> {
  const err = await promise.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(isAegisError(err) ? err.code : err).toBe(code);
}

describe('buildImageFilesystem', () => {
  let image: string;
  const bigContent = createHash('sha512').update('seed').digest('hex').repeat(40_000);

  beforeAll(async () => {
    const lower = await layer(
      [
        { name: 'etc/', type: 'directory' },
        { name: 'etc/gone.conf', content: 'lower\n' },
        { name: 'etc/kept.conf', content: 'kept\n' },
        { name: 'opaque/', type: 'directory', mode: 0o750 },
        { name: 'opaque/old-file', content: 'old' },
        { name: 'opaque/old-dir/', type: 'directory' },
        { name: 'opaque/old-dir/deep', content: 'deep' },
        { name: 'becomes-dir', content: 'was a file' },
        { name: 'becomes-file/', type: 'directory' },
        { name: 'becomes-file/child', content: 'child' },
        { name: 'bin/', type: 'directory' },
        { name: 'bin/tool', content: '#!/bin/true\n', mode: 0o4755 },
        { name: 'bin/big', content: bigContent, mode: 0o755 },
        { name: 'dev/', type: 'directory' },
        { name: 'dev/null', type: 'character-device', devmajor: 1, devminor: 3, mode: 0o666 },
        { name: 'dev/sda', type: 'block-device', devmajor: 8, devminor: 0, mode: 0o660, gid: 6 },
        { name: 'run/', type: 'directory' },
        { name: 'run/pipe', type: 'fifo', mode: 0o620 },
        { name: 'tmp/', type: 'directory', mode: 0o1777 },
        { name: 'shared/', type: 'directory', mode: 0o2775, gid: 50 },
      ],
      true,
    );
    const upper = await layer([
      { name: 'etc/.wh.gone.conf' },
      { name: 'opaque/', type: 'directory', mode: 0o755 },
      { name: 'opaque/.wh..wh..opq' },
      { name: 'opaque/new-file', content: 'new' },
      { name: 'becomes-dir/', type: 'directory' },
      { name: 'becomes-dir/inside', content: 'inside' },
      { name: 'becomes-file', content: 'now a file' },
      { name: 'bin/tool-link', type: 'link', linkname: 'bin/tool' },
      { name: 'bin/abs-symlink', type: 'symlink', linkname: '/bin/tool' },
      { name: 'bin/rel-symlink', type: 'symlink', linkname: '../etc/kept.conf' },
      { name: 'bin/symlink-link', type: 'link', linkname: 'bin/rel-symlink' },
      { name: 'home/', type: 'directory' },
      { name: 'home/app/', type: 'directory', uid: 1000, gid: 1000, mode: 0o700 },
      { name: 'home/app/secret', content: 'secret', uid: 1000, gid: 1000, mode: 0o640 },
      { name: 'nobody-owned', content: 'n', uid: 65534, gid: 65534, mode: 0o600 },
      { name: 'dated', content: 'd', mtime: new Date('1999-12-31T23:59:59Z') },
      { name: 'with space/a file "quoted" name.txt', content: 'spaces' },
      { name: 'ünïcödé.txt', content: 'utf-8' },
      { name: 'readonly', content: 'r', mode: 0o400 },
      { name: 'exec-only', content: 'x', mode: 0o111 },
      { name: 'run/pipe-link', type: 'link', linkname: 'run/pipe' },
      { name: 'dev/nvme0n1p300', type: 'block-device', devmajor: 259, devminor: 300 },
      { name: 'doomed/', type: 'directory' },
      { name: 'doomed/inner', content: 'x' },
      { name: 'twice', content: 'first' },
      { name: 'twice', content: 'second' },
      { name: 'odd/<12>', content: 'not inode 12' },
      { name: 'odd/-rf', content: 'not an option', pax: { 'SCHILY.xattr.user.note': 'kept' } },
      {
        name: 'odd/ping',
        content: 'p',
        pax: { 'SCHILY.xattr.security.capability': '\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' },
      },
    ]);
    const top = await layer([{ name: '.wh.doomed' }, { name: 'bin/tool', content: 'replaced', mode: 0o755 }]);
    image = await build([lower, upper, top]);
  });

  it('deletes a lower file named by a whiteout and keeps its siblings', () => {
    expect(ls(image, '/etc')).toEqual(['kept.conf']);
    expect(cat(image, '/etc/kept.conf')).toBe('kept\n');
  });

  it('hides everything a lower layer put in an opaque directory but keeps the same layer entries', () => {
    expect(ls(image, '/opaque')).toEqual(['new-file']);
    expect(stat(image, '/opaque')?.mode).toBe(0o755);
  });

  it('replaces a file with a directory and a directory with a file', () => {
    expect(stat(image, '/becomes-dir')?.type).toBe('directory');
    expect(ls(image, '/becomes-dir')).toEqual(['inside']);
    expect(stat(image, '/becomes-file')?.type).toBe('regular');
    expect(cat(image, '/becomes-file')).toBe('now a file');
  });

  it('links a hard link in an upper layer to the lower layer inode, which outlives a later replacement', () => {
    expect(stat(image, '/bin/tool-link')).toMatchObject({ mode: 0o4755, links: 1 });
    expect(cat(image, '/bin/tool-link')).toBe('#!/bin/true\n');
    expect(cat(image, '/bin/tool')).toBe('replaced');
    expect(inodeOf(image, '/bin/tool-link')).not.toBe(inodeOf(image, '/bin/tool'));
  });

  it('links hard links to special files', () => {
    expect(inodeOf(image, '/run/pipe-link')).toBe(inodeOf(image, '/run/pipe'));
    expect(stat(image, '/run/pipe')?.links).toBe(2);
  });

  it('deletes a whole lower directory named by a whiteout', () => {
    expect(stat(image, '/doomed')).toBeUndefined();
  });

  it('writes names debugfs would otherwise read as an inode number or an option', () => {
    expect(cat(image, '/odd/<12>')).toBe('not inode 12');
    expect(cat(image, '/odd/-rf')).toBe('not an option');
  });

  it('keeps extended attributes from PAX headers', () => {
    expect(debugfs(image, 'ea_get /odd/-rf user.note')).toContain('kept');
    expect(debugfs(image, 'ea_list /odd/ping')).toContain('security.capability');
  });

  it('lets the later of two entries with one name in a layer win', () => {
    expect(cat(image, '/twice')).toBe('second');
  });

  it('keeps absolute and relative symlink targets verbatim', () => {
    expect(stat(image, '/bin/abs-symlink')?.type).toBe('symlink');
    expect(debugfs(image, 'stat /bin/abs-symlink')).toContain('Fast link dest: "/bin/tool"');
    expect(debugfs(image, 'stat /bin/rel-symlink')).toContain('Fast link dest: "../etc/kept.conf"');
    // ext4 gets a copy rather than a second name for a hard-linked symlink; it reads the same.
    expect(debugfs(image, 'stat /bin/symlink-link')).toContain('Fast link dest: "../etc/kept.conf"');
    expect(stat(image, '/bin/symlink-link')).toMatchObject({ uid: 0, gid: 0, mtime: MTIME.getTime() / 1000 });
  });

  it('keeps setuid, setgid and sticky bits and unreadable modes', () => {
    expect(stat(image, '/bin/tool-link')?.mode).toBe(0o4755);
    expect(stat(image, '/tmp')?.mode).toBe(0o1777);
    expect(stat(image, '/shared')).toMatchObject({ mode: 0o2775, gid: 50 });
    expect(stat(image, '/readonly')?.mode).toBe(0o400);
    expect(stat(image, '/exec-only')?.mode).toBe(0o111);
  });

  it('sets owners inside the image, whoever built it', () => {
    expect(stat(image, '/home/app')).toMatchObject({ uid: 1000, gid: 1000, mode: 0o700 });
    expect(stat(image, '/home/app/secret')).toMatchObject({ uid: 1000, gid: 1000, mode: 0o640 });
    expect(stat(image, '/nobody-owned')).toMatchObject({ uid: 65534, gid: 65534, mode: 0o600 });
    expect(stat(image, '/etc/kept.conf')).toMatchObject({ uid: 0, gid: 0 });
    expect(stat(image, '/')).toMatchObject({ uid: 0, gid: 0, mode: 0o755 });
  });

  it('keeps modification times', () => {
    expect(stat(image, '/etc/kept.conf')?.mtime).toBe(MTIME.getTime() / 1000);
    expect(stat(image, '/dated')?.mtime).toBe(Date.parse('1999-12-31T23:59:59Z') / 1000);
  });

  it('makes device nodes and fifos with their numbers and modes', () => {
    expect(stat(image, '/dev/null')).toMatchObject({ type: 'character special', mode: 0o666, device: '01:03' });
    expect(stat(image, '/dev/sda')).toMatchObject({ type: 'block special', mode: 0o660, gid: 6, device: '08:00' });
    expect(stat(image, '/run/pipe')).toMatchObject({ type: 'FIFO', mode: 0o620 });
    expect(stat(image, '/dev/nvme0n1p300')?.device).toBe('259:300');
  });

  it('copies contents byte for byte, including names with spaces, quotes and non-ASCII', () => {
    expect(cat(image, '/bin/big')).toBe(bigContent);
    expect(cat(image, '/with space/a file "quoted" name.txt')).toBe('spaces');
    expect(ls(image, '/')).toContain(Buffer.from('ünïcödé.txt').toString('latin1'));
  });

  it('adds nothing the layers did not have, not even lost+found', () => {
    expect(ls(image, '/')).toEqual(
      [
        'becomes-dir',
        'becomes-file',
        'bin',
        'dated',
        'dev',
        'etc',
        'exec-only',
        'home',
        'nobody-owned',
        'odd',
        'opaque',
        'readonly',
        'run',
        'twice',
        'shared',
        'tmp',
        'with space',
        Buffer.from('ünïcödé.txt').toString('latin1'),
      ].sort(),
    );
  });

  it('makes an ext4 filesystem without a journal that e2fsck finds clean', () => {
    const features = execFileSync('dumpe2fs', ['-h', image], { env: ENV, stdio: ['ignore', 'pipe', 'ignore'] }).toString();
    expect(features).toMatch(/Filesystem features:.*extent/);
    expect(features).not.toMatch(/has_journal/);
    const fsck = spawnSync('e2fsck', ['-fn', image], { env: ENV });
    expect(fsck.stdout.toString()).not.toMatch(/Fix\?|Clear\?|Salvage\?/);
  });
});

describe('buildImageFilesystem on hostile or unsupported layers', () => {
  it('rejects `..` in an entry name', async () => {
    await expectCode(build([await layer([{ name: '../escape', content: 'x' }])]), 'INVALID_ARGUMENT');
    await expectCode(build([await layer([{ name: 'a/../../escape', content: 'x' }])]), 'INVALID_ARGUMENT');
  });

  it('rejects a hard link whose target climbs out of the image', async () => {
    await expectCode(build([await layer([{ name: 'link', type: 'link', linkname: '../../etc/passwd' }])]), 'INVALID_ARGUMENT');
  });

  it('rejects a hard link to something no layer has', async () => {
    await expectCode(build([await layer([{ name: 'link', type: 'link', linkname: 'etc/passwd' }])]), 'INVALID_ARGUMENT');
  });

  it('resolves entries through a symlink inside the image, never on the host', async () => {
    const marker = `aegis-escape-${process.pid}-${Date.now()}`;
    const image = await build([
      await layer([
        { name: 'up', type: 'symlink', linkname: '../../../../../../tmp' },
        { name: 'abs', type: 'symlink', linkname: '/' },
      ]),
      await layer([
        { name: `up/${marker}`, content: 'through a relative symlink' },
        { name: `abs/etc/${marker}`, content: 'through an absolute symlink' },
      ]),
    ]);
    expect(existsSync(`/tmp/${marker}`)).toBe(false);
    expect(existsSync(`/etc/${marker}`)).toBe(false);
    expect(cat(image, `/tmp/${marker}`)).toBe('through a relative symlink');
    expect(cat(image, `/etc/${marker}`)).toBe('through an absolute symlink');
  });

  it('rejects a zstd layer as unsupported, whatever its media type says', async () => {
    const file = path.join(tmp, 'layer.zst');
    await fs.writeFile(file, Buffer.from([0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0]));
    await expectCode(build([{ path: file, mediaType: TAR }]), 'UNSUPPORTED');
    await expectCode(build([{ path: file, mediaType: 'application/vnd.oci.image.layer.v1.tar+zstd' }]), 'UNSUPPORTED');
  });

  it('rejects a damaged gzip layer as invalid', async () => {
    const good = await layer([{ name: 'f', content: 'x'.repeat(10_000) }], true);
    const bytes = readFileSync(good.path);
    const file = path.join(tmp, 'damaged.tar.gz');
    await fs.writeFile(file, bytes.subarray(0, bytes.length - 40));
    await expectCode(build([{ path: file, mediaType: TAR_GZIP }]), 'INVALID_ARGUMENT');
  });

  it('leaves no staging tree or partial output behind after a failure', async () => {
    const dir = await fs.mkdtemp(path.join(tmp, 'clean-'));
    const bad = await layer([{ name: '../x', content: 'x' }]);
    await expectCode(buildImageFilesystem([bad], path.join(dir, 'out.ext4')), 'INVALID_ARGUMENT');
    expect(await fs.readdir(dir)).toEqual([]);
  });

  it('is cancelled by its signal', async () => {
    const controller = new AbortController();
    controller.abort();
    await expectCode(
      buildImageFilesystem([await layer([{ name: 'f', content: 'x' }])], path.join(tmp, 'x.ext4'), { signal: controller.signal }),
      'CANCELLED',
    );
  });
});

describe('import bombs (issue 26): limits counted as the layers stream', () => {
  async function refusal(layers: LayerFile[], limits: Partial<ImageLimits>): Promise<{ code: string; message: string; left: string[] }> {
    const dir = await fs.mkdtemp(path.join(tmp, 'bomb-'));
    const err = await buildImageFilesystem(layers, path.join(dir, 'out.ext4'), { limits }).then(
      () => new Error('built'),
      (e: Error) => e,
    );
    return { code: isAegisError(err) ? err.code : String(err), message: err.message, left: await fs.readdir(dir) };
  }

  async function bombFile(files: number): Promise<LayerFile> {
    const file = path.join(tmp, `bomb-${counter++}.tar.gz`);
    await pipeline(bombLayer(files), createGzip({ level: 1 }), createWriteStream(file));
    return { path: file, mediaType: TAR_GZIP };
  }

  it('an import bomb of 200k empty files is refused at the entry limit per layer, leaving nothing behind', async () => {
    const r = await refusal([await bombFile(200_000)], { entriesPerLayer: 10_000 });
    expect(r).toEqual({
      code: 'RESOURCE_EXHAUSTED',
      message: expect.stringMatching(/exceeds 10,000 entries, the limit per layer$/),
      left: [],
    });
  });

  it('the tree refuses the entry past the limit, implied parent directories included, so it never holds more', async () => {
    const tree = new LayerTree(new ContentStore(tmp), { entriesPerLayer: 100, entriesPerImage: 150 });
    const entry = (name: string) => ({
      header: { name, type: 'file', size: 0, mode: 0o644 } as tar.Header,
      async *[Symbol.asyncIterator]() {},
    });
    // 1 implied directory + 99 files: exactly the limit.
    for (let i = 0; i < 99; i++) await tree.apply(entry(`dir/f${i}`), 0, 'layer 1');
    expect(tree.entries).toBe(100);
    const err = await rejection(tree.apply(entry('one-more'), 0, 'layer 1'));
    expect([isAegisError(err) && err.code, err.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      'layer 1 exceeds 100 entries, the limit per layer',
    ]);
    // A second layer has its own count, but the image's count goes on.
    for (let i = 0; i < 50; i++) await tree.apply(entry(`g${i}`), 1, 'layer 2');
    const perImage = await rejection(tree.apply(entry('too-many'), 1, 'layer 2'));
    expect(perImage.message).toBe('the image exceeds 150 entries, the limit per image');
  });

  it('an image over the entry limit per image is refused across its layers', async () => {
    const r = await refusal([await bombFile(600), await bombFile(600)], { entriesPerImage: 1000 });
    expect([r.code, r.message, r.left]).toEqual(['RESOURCE_EXHAUSTED', 'the image exceeds 1,000 entries, the limit per image', []]);
  });

  it('a path more directories deep than the limit is refused as invalid', async () => {
    const deep = `${Array.from({ length: 300 }, () => 'a').join('/')}/f`;
    const r = await refusal([await layer([{ name: deep, content: 'x' }])], {});
    expect(r.code).toBe('INVALID_ARGUMENT');
    expect(r.message).toMatch(/more than 256 directories deep, the limit per path$/);
  });

  it('a file bigger than the unpacked limit is refused on its declared size, before it is written', async () => {
    const r = await refusal([await layer([{ name: 'big', content: Buffer.alloc(3 << 20) }], true)], { unpackedBytesPerImage: 1 << 20 });
    expect([r.code, r.message, r.left]).toEqual(['RESOURCE_EXHAUSTED', 'the image unpacked exceeds 1 MiB, the limit per image', []]);
  });

  it('a gzip of zeros (no entries at all) is refused at the unpacked limit rather than inflated to its end', async () => {
    const file = path.join(tmp, 'zeros.tar.gz');
    await fs.writeFile(file, gzipSync(Buffer.alloc(8 << 20)));
    const r = await refusal([{ path: file, mediaType: TAR_GZIP }], { unpackedBytesPerImage: 1 << 20 });
    expect([r.code, r.message]).toEqual(['RESOURCE_EXHAUSTED', 'the image unpacked exceeds 1 MiB, the limit per image']);
  });

  it('an oversized PAX header is refused', async () => {
    const pax = { 'SCHILY.xattr.user.big': 'x'.repeat(4096) };
    const r = await refusal([await layer([{ name: 'f', content: 'x', pax }])], { paxHeaderBytesPerEntry: 1024 });
    expect([r.code, r.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      expect.stringMatching(/^a PAX header in layer 1 .* exceeds 1 KiB, the limit per entry$/),
    ]);
  });

  it('long symlink targets are refused past the metadata budget, whatever the entry count', async () => {
    const links = Array.from({ length: 10 }, (_, i) => ({ name: `l${i}`, type: 'symlink' as const, linkname: `/${'t'.repeat(2000)}` }));
    const r = await refusal([await layer(links)], { metadataBytesPerImage: 10_000 });
    expect([r.code, r.message]).toEqual([
      'RESOURCE_EXHAUSTED',
      'the names, symlink targets and extended attributes of the image exceeds 10,000 bytes, the limit per image',
    ]);
  });
});

describe('buildImageFilesystem as an ordinary user', () => {
  const root = process.getuid?.() === 0;

  it('gives the same bytes for the same layers', async () => {
    const layers = [
      await layer(
        [
          { name: 'a/b', content: 'b', uid: 7 },
          { name: 'c', type: 'symlink', linkname: 'a/b' },
        ],
        true,
      ),
    ];
    const one = readFileSync(await build(layers));
    const two = readFileSync(await build(layers));
    expect(createHash('sha256').update(one).digest('hex')).toBe(createHash('sha256').update(two).digest('hex'));
  });

  // Under root the test drops to nobody; as an ordinary user every other test already proves it.
  it.skipIf(!root)('builds root-owned files and device nodes without any privilege (setpriv to 65534)', async () => {
    const { build: bundle } = await import('esbuild');
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-rootless-'));
    try {
      await fs.chmod(dir, 0o755);
      const bundled = path.join(dir, 'layers.cjs');
      const here = path.dirname(fileURLToPath(import.meta.url));
      await bundle({
        entryPoints: [path.join(here, 'layers.ts')],
        bundle: true,
        platform: 'node',
        format: 'cjs',
        outfile: bundled,
        logLevel: 'silent',
        alias: { '@aegis/protocol': path.join(here, '../../../protocol/src/index.ts') },
      });
      const l = await layer([
        { name: 'root-owned', content: 'r', mode: 0o4750 },
        { name: 'dev/', type: 'directory' },
        { name: 'dev/tty', type: 'character-device', devmajor: 5, devminor: 0, mode: 0o666 },
        { name: 'app/', type: 'directory', uid: 1000, gid: 1000 },
      ]);
      const input = path.join(dir, 'layer.tar');
      await fs.copyFile(l.path, input);
      await fs.chmod(input, 0o644);
      const outDir = path.join(dir, 'out');
      await fs.mkdir(outDir);
      await fs.chown(outDir, 65534, 65534);
      const out = path.join(outDir, 'image.ext4');
      const script = `require(${JSON.stringify(bundled)}).buildImageFilesystem([{ path: ${JSON.stringify(input)}, mediaType: ${JSON.stringify(TAR)} }], ${JSON.stringify(out)}).then(() => console.log(process.getuid()), (e) => { console.error(e); process.exit(1); })`;
      const child = spawnSync('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, '-e', script], {
        env: ENV,
        cwd: dir,
      });
      expect(child.stderr.toString()).toBe('');
      expect(child.stdout.toString().trim()).toBe('65534');
      expect((await fs.stat(out)).uid).toBe(65534);
      expect(stat(out, '/root-owned')).toMatchObject({ uid: 0, gid: 0, mode: 0o4750 });
      expect(stat(out, '/dev/tty')).toMatchObject({ type: 'character special', uid: 0, device: '05:00' });
      expect(stat(out, '/app')).toMatchObject({ uid: 1000, gid: 1000 });
      expect(await fs.readdir(outDir)).toEqual(['image.ext4']);
      // Nothing about the builder's identity reaches the image: root gets the very same bytes.
      const asRoot = await build([{ path: input, mediaType: TAR }]);
      expect(readFileSync(asRoot).equals(readFileSync(out))).toBe(true);
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});
