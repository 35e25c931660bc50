/**
 * The test-image fixtures, flattened by the daemon's layer code: the images are what they claim to
 * be, and buildImageFilesystem applies their whiteouts, owners and links. No VM is booted.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildImageFilesystem } from '../../packages/daemon/src/images/layers.js';
import {
  GLIBC_IMAGE,
  STATIC_IMAGE,
  buildGlibcImage,
  buildStaticImage,
  exportDockerArchive,
  imageConfig,
  imageLayers,
} from '../support/oci-images.js';

const ENV = { ...process.env, PATH: `${process.env['PATH'] ?? ''}:/usr/sbin:/sbin` };
let tmp: string;

function debugfs(image: string, command: string): string {
  return execFileSync('debugfs', ['-R', command, image], { env: ENV, stdio: ['ignore', 'pipe', 'ignore'], maxBuffer: 64 << 20 }).toString();
}

function inodeOf(image: string, p: string): number | undefined {
  const m = /Inode: (\d+)/.exec(debugfs(image, `stat "${p}"`));
  return m ? Number(m[1]) : undefined;
}

function names(image: string, dir: string): string[] {
  return debugfs(image, `ls -p "${dir}"`)
    .split('\n')
    .map((l) => l.split('/')[5])
    .filter((n): n is string => n !== undefined && n !== '' && n !== '.' && n !== '..')
    .sort();
}

beforeAll(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-oci-images-'));
}, 600_000);

afterAll(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

describe('the glibc test image', () => {
  let image: string;

  beforeAll(async () => {
    const { layoutDir, ref } = await buildGlibcImage();
    image = path.join(tmp, 'glibc.ext4');
    const started = performance.now();
    const built = await buildImageFilesystem(await imageLayers(layoutDir, ref), image);
    const seconds = (performance.now() - started) / 1000;
    console.log(`glibc image: ${built.fileCount} files, ${(built.sizeBytes / 2 ** 20).toFixed(1)} MiB ext4 in ${seconds.toFixed(2)} s`);
  }, 900_000);

  it('has python3 from the lower layer', () => {
    expect(debugfs(image, 'stat /usr/bin/python3')).toMatch(/Type: symlink/);
    expect(debugfs(image, `stat ${GLIBC_IMAGE.hardlinkTarget}`)).toMatch(/Type: regular\s+Mode:\s+0755/);
  });

  it('applies the upper layer whiteout and opaque directory', () => {
    expect(inodeOf(image, GLIBC_IMAGE.whitedOut)).toBeUndefined();
    expect(inodeOf(image, GLIBC_IMAGE.kept)).toBeDefined();
    expect(names(image, GLIBC_IMAGE.opaqueDir)).toEqual([GLIBC_IMAGE.opaqueNew]);
  });

  it('keeps the owner and mode of the file uid 1000 owns', () => {
    const stat = debugfs(image, `stat ${GLIBC_IMAGE.ownedFile}`);
    expect(stat).toMatch(/Mode:\s+0640/);
    expect(stat).toMatch(/User:\s+1000\s+Group:\s+1000/);
    expect(debugfs(image, 'stat /usr/bin/python3.11')).toMatch(/User:\s+0\s+Group:\s+0/);
  });

  it('links the upper hard link to the lower inode and keeps the symlink', () => {
    expect(inodeOf(image, GLIBC_IMAGE.hardlink)).toBe(inodeOf(image, GLIBC_IMAGE.hardlinkTarget));
    expect(debugfs(image, `stat ${GLIBC_IMAGE.symlink}`)).toContain('Fast link dest: "/usr/bin/python3"');
  });

  it('describes the non-root variant with User set to a user in /etc/passwd', async () => {
    const { layoutDir, ref } = await buildGlibcImage(undefined, { user: true });
    const config = await imageConfig(layoutDir, ref);
    expect(config.User).toBe(GLIBC_IMAGE.user.name);
    expect(debugfs(image, 'cat /etc/passwd')).toContain(`${GLIBC_IMAGE.user.name}:x:${GLIBC_IMAGE.user.uid}:`);
  });

  it('exports as a docker-archive tar', async () => {
    const { layoutDir, ref } = await buildGlibcImage();
    const out = path.join(tmp, 'glibc.tar');
    await exportDockerArchive(layoutDir, ref, out);
    expect(execFileSync('tar', ['-tf', out]).toString()).toContain('manifest.json');
  });
});

describe('the static test image', () => {
  let image: string;

  beforeAll(async () => {
    const { layoutDir, ref } = await buildStaticImage();
    image = path.join(tmp, 'static.ext4');
    await buildImageFilesystem(await imageLayers(layoutDir, ref), image);
    expect((await imageConfig(layoutDir, ref)).Entrypoint).toEqual(STATIC_IMAGE.entrypoint);
  }, 600_000);

  it('holds busybox and its applet links but no libc and no shell', () => {
    expect(debugfs(image, 'stat /bin/busybox')).toMatch(/Type: regular\s+Mode:\s+0755/);
    expect(names(image, '/bin')).toEqual(['busybox', 'cat', 'echo']);
    expect(names(image, '/')).toEqual(['bin', 'tmp']);
    expect(existsSync(image)).toBe(true);
  });
});
