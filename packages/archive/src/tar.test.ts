import {
  mkdtempSync,
  promises as fs,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  lstatSync,
  writeFileSync,
  mkdirSync,
  symlinkSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import * as tar from 'tar-stream';
import { extractTar, packPath } from './tar.js';

type Entry = Partial<tar.Header> & { name: string; body?: string };

/** A tar made entry by entry, as a hostile guest could make it. */
async function tarOf(entries: Entry[]): Promise<Readable> {
  const pack = tar.pack();
  for (const { body, ...h } of entries) pack.entry({ ...h, mode: h.mode ?? 0o644 }, body ?? '');
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
  return Readable.from([Buffer.concat(chunks)]);
}

let top: string;
let dest: string;
let outside: string;
beforeEach(() => {
  top = mkdtempSync(path.join(os.tmpdir(), 'aegis-tar-'));
  dest = path.join(top, 'dest');
  outside = path.join(top, 'outside');
  mkdirSync(dest);
  mkdirSync(outside);
  writeFileSync(path.join(outside, 'victim'), 'untouched');
});
afterEach(() => rmSync(top, { recursive: true, force: true }));

describe('extractTar', () => {
  it('round-trips a tree packed by packPath: files, modes, symlinks, empty files, nested directories', async () => {
    const src = path.join(top, 'src');
    mkdirSync(path.join(src, 'sub/deeper'), { recursive: true });
    writeFileSync(path.join(src, 'a.txt'), 'alpha');
    writeFileSync(path.join(src, 'empty'), '');
    writeFileSync(path.join(src, 'sub/deeper/run.sh'), '#!/bin/sh\n', { mode: 0o755 });
    symlinkSync('a.txt', path.join(src, 'link'));
    const r = await extractTar(packPath(src, 'copy'), dest);
    expect(r.skipped).toEqual([]);
    expect(readFileSync(path.join(dest, 'copy/a.txt'), 'utf8')).toBe('alpha');
    expect(readFileSync(path.join(dest, 'copy/empty'), 'utf8')).toBe('');
    expect(statSync(path.join(dest, 'copy/sub/deeper/run.sh')).mode & 0o777).toBe(0o755);
    expect(readlinkSync(path.join(dest, 'copy/link'))).toBe('a.txt');
    expect(r.entries).toBe(7);
  });

  it('keeps every entry inside the destination: .., absolute names, writes through symlinks, links out', async () => {
    const r = await extractTar(
      await tarOf([
        { name: '../outside/victim', body: 'escaped' },
        { name: '/outside-abs', body: 'absolute' },
        { name: 'ok/../../outside/victim', body: 'escaped' },
        // A symlink to the outside, then a file "inside" it.
        { name: 'esc', type: 'symlink', linkname: '../outside' },
        { name: 'esc/victim', body: 'through a symlink' },
        { name: 'esc/new', body: 'through a symlink' },
        // A symlink at a file's name, then the file: the link is replaced, not followed.
        { name: 'victimlink', type: 'symlink', linkname: path.join(outside, 'victim') },
        { name: 'victimlink', body: 'replaced the link' },
        // Hard links may only name what was extracted here.
        { name: 'hard', type: 'link', linkname: '../outside/victim' },
        { name: 'hard2', type: 'link', linkname: path.join(outside, 'victim') },
        { name: 'dev', type: 'character-device', devmajor: 1, devminor: 3 },
        { name: 'fifo', type: 'fifo' },
        { name: 'suid', body: '#!/bin/sh', mode: 0o4755 },
      ]),
      dest,
    );
    expect(readFileSync(path.join(outside, 'victim'), 'utf8')).toBe('untouched');
    expect(await fs.readdir(outside)).toEqual(['victim']);
    expect(readFileSync(path.join(dest, 'outside-abs'), 'utf8')).toBe('absolute');
    expect(lstatSync(path.join(dest, 'victimlink')).isFile()).toBe(true);
    expect(readFileSync(path.join(dest, 'victimlink'), 'utf8')).toBe('replaced the link');
    for (const gone of ['hard', 'hard2', 'dev', 'fifo'])
      expect(lstatSync(path.join(dest, gone), { throwIfNoEntry: false })).toBeUndefined();
    expect(statSync(path.join(dest, 'suid')).mode & 0o7777).toBe(0o755);
    expect(r.skipped.join('\n')).toMatch(/\.\.\/outside\/victim: a "\.\." in its name/);
    expect(r.skipped.join('\n')).toMatch(/esc\/victim: its directory is not a directory/);
    expect(r.skipped.join('\n')).toMatch(/dev: a character-device entry/);
  });

  it('links inside the destination work; special bits stay when asked (the guest side)', async () => {
    await extractTar(
      await tarOf([
        { name: 'd', type: 'directory', mode: 0o750 },
        { name: 'd/f', body: 'data', mode: 0o6755 },
        { name: 'd/h', type: 'link', linkname: 'd/f' },
      ]),
      dest,
      { keepSpecialBits: true },
    );
    expect(statSync(path.join(dest, 'd/h')).ino).toBe(statSync(path.join(dest, 'd/f')).ino);
    expect(statSync(path.join(dest, 'd/f')).mode & 0o7777).toBe(0o6755);
    expect(statSync(path.join(dest, 'd')).mode & 0o777).toBe(0o750);
  });

  it('a copy that fails half-way (a 300-character name: ENAMETOOLONG) removes what it made and says which entry', async () => {
    writeFileSync(path.join(dest, 'kept'), 'there before');
    const long = 'n'.repeat(300);
    const stream = await tarOf([
      { name: 'tree/', type: 'directory', mode: 0o755 },
      { name: 'tree/a.txt', body: 'a' },
      { name: 'b.txt', body: 'b' },
      { name: `tree/${long}`, body: 'too long' },
      { name: 'c.txt', body: 'never reached' },
    ]);
    const err = (await extractTar(stream, dest).then(
      () => undefined,
      (e: unknown) => e,
    )) as { code: string; message: string };
    expect(err).toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect(err.message).toMatch(new RegExp(`^cannot write tree/${long.slice(0, 20)}n* here: ENAMETOOLONG`));
    expect((await fs.readdir(dest)).sort()).toEqual(['kept']);
    expect(readFileSync(path.join(dest, 'kept'), 'utf8')).toBe('there before');
  });

  it('refuses a stream that is not a tar, with INVALID_ARGUMENT', async () => {
    await expect(extractTar(Readable.from([Buffer.alloc(1024, 7)]), dest)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });
});
