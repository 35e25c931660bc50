/**
 * Files in and out (issue "Files in and out"): `aegis cp` with Docker's rules and the files API
 * on real VMs — big transfers with checksums, concurrency, errors, and a hostile guest whose
 * tar tries to write outside the host destination.
 */
import { createHash } from 'node:crypto';
import {
  createReadStream,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { open } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import * as tar from 'tar-stream';
import { afterAll, describe, expect, it } from 'vitest';
import { useDaemon } from './fixture.js';

const daemon = useDaemon();
const work = mkdtempSync(path.join(os.tmpdir(), 'aegis-files-'));
afterAll(() => rmSync(work, { recursive: true, force: true }));

async function sha256(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/** A file of `mib` MiB of pseudo-random bytes (fast: one random MiB, each copy perturbed). */
async function bigFile(file: string, mib: number): Promise<void> {
  const block = Buffer.alloc(1 << 20);
  for (let i = 0; i < block.length; i += 4) block.writeUInt32LE((Math.random() * 2 ** 32) >>> 0, i);
  const fh = await open(file, 'w');
  for (let i = 0; i < mib; i++) {
    block.writeUInt32LE(i, 0);
    await fh.write(block);
  }
  await fh.close();
}

describe('aegis cp', () => {
  it('copies files and trees both ways with Docker’s rules, keeping modes; - is a tar on stdin/stdout', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'box', command: ['sleep', '600'], network: 'none' });
    const src = path.join(work, 'repo');
    mkdirSync(path.join(src, 'sub'), { recursive: true });
    writeFileSync(path.join(src, 'a.txt'), 'alpha\n');
    writeFileSync(path.join(src, 'sub', 'run.sh'), '#!/bin/sh\necho ran\n', { mode: 0o755 });

    // A new name: the tree arrives as /work; again: into the existing /work, as /work/repo.
    expect((await d.cli(['cp', src, 'box:/work'])).code).toBe(0);
    expect((await d.cli(['cp', src, 'box:/work'])).code).toBe(0);
    const tree = await d.cli(['exec', 'box', '--', 'sh', '-c', 'cd /work && find . | sort && stat -c %a sub/run.sh && ./sub/run.sh']);
    expect(tree.stdout).toBe('.\n./a.txt\n./repo\n./repo/a.txt\n./repo/sub\n./repo/sub/run.sh\n./sub\n./sub/run.sh\n755\nran\n');
    // Owned by root in the guest unless -a, as docker cp.
    expect((await d.cli(['exec', 'box', '--', 'stat', '-c', '%u', '/work/a.txt'])).stdout).toBe('0\n');

    // Out: into an existing directory, to a new name, and a directory's contents (/.).
    const out = path.join(work, 'out');
    mkdirSync(out);
    expect((await d.cli(['cp', 'box:/work/sub', out])).code).toBe(0);
    expect(readFileSync(path.join(out, 'sub', 'run.sh'), 'utf8')).toContain('echo ran');
    expect(statSync(path.join(out, 'sub', 'run.sh')).mode & 0o777).toBe(0o755);
    expect((await d.cli(['cp', 'box:/work/a.txt', path.join(out, 'renamed.txt')])).code).toBe(0);
    expect(readFileSync(path.join(out, 'renamed.txt'), 'utf8')).toBe('alpha\n');
    expect((await d.cli(['cp', 'box:/work/repo/.', path.join(out, 'contents')])).code).toBe(0);
    expect(readdirSync(path.join(out, 'contents')).sort()).toEqual(['a.txt', 'sub']);
    // A symlink comes out as the link itself, as docker cp copies it (not what it points to).
    await d.cli(['exec', 'box', '--', 'ln', '-s', 'a.txt', '/work/link']);
    expect((await d.cli(['cp', 'box:/work/link', path.join(out, 'link')])).code).toBe(0);
    expect(readlinkSync(path.join(out, 'link'))).toBe('a.txt');

    // `-`: a tar on stdout, and one on stdin.
    const listed = await d.cli(['cp', 'box:/work/sub', '-']);
    expect(listed.code).toBe(0);
    const pack = tar.pack();
    pack.entry({ name: 'from-stdin.txt' }, 'piped\n');
    pack.finalize();
    const chunks: Buffer[] = [];
    for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
    const put = await d.cli(['cp', '-', 'box:/work'], { input: Buffer.concat(chunks).toString('latin1') });
    expect(put.code).toBe(0);
    expect((await d.cli(['exec', 'box', '--', 'cat', '/work/from-stdin.txt'])).stdout).toBe('piped\n');

    // Errors: a coded line, nothing copied.
    const missing = await d.cli(['cp', 'box:/nope', out]);
    expect(missing.stderr).toMatch(/^aegis: \/nope: no such file or directory \[NOT_FOUND\]\n$/);
    expect((await d.cli(['cp', path.join(work, 'nope'), 'box:/work'])).stderr).toMatch(/no such file or directory.*\[NOT_FOUND\]/);
    expect((await d.cli(['cp', src, 'box:/no/such/dir/x'])).stderr).toMatch(/no such directory: box:\/no\/such\/dir \[NOT_FOUND\]/);
    expect((await d.cli(['cp', src, out])).stderr).toMatch(/exactly one of SRC and DEST is INSTANCE:PATH \[INVALID_ARGUMENT\]/);
  });

  it('round-trips 500 MiB with matching checksums, and four copies at once', async () => {
    const d = daemon();
    // Enough memory for 500 MiB in /tmp? No: the copy goes to the scratch disk (/root).
    await d.client.createInstance({ handle: 'big', command: ['sleep', '600'], network: 'none' });
    const file = path.join(work, 'big.bin');
    await bigFile(file, 500);
    const sum = await sha256(file);
    expect((await d.cli(['cp', file, 'big:/root/big.bin'], { timeoutMs: 300_000 })).code).toBe(0);
    expect((await d.cli(['exec', 'big', '--', 'sha256sum', '/root/big.bin'])).stdout.split(' ')[0]).toBe(sum);
    const back = path.join(work, 'big.back');
    expect((await d.cli(['cp', 'big:/root/big.bin', back], { timeoutMs: 300_000 })).code).toBe(0);
    expect(await sha256(back)).toBe(sum);
    rmSync(back);
    rmSync(file);

    // Concurrent: four different files in, then out, at the same time on one instance.
    const names = ['c1', 'c2', 'c3', 'c4'];
    const sums = new Map<string, string>();
    for (const n of names) {
      await bigFile(path.join(work, n), 8);
      sums.set(n, await sha256(path.join(work, n)));
    }
    const ins = await Promise.all(names.map((n) => d.cli(['cp', path.join(work, n), `big:/root/${n}`])));
    expect(ins.map((r) => [r.code, r.stderr])).toEqual(names.map(() => [0, '']));
    const outDir = path.join(work, 'concurrent');
    mkdirSync(outDir);
    const outs = await Promise.all(names.map((n) => d.cli(['cp', `big:/root/${n}`, outDir])));
    expect(outs.map((r) => [r.code, r.stderr])).toEqual(names.map(() => [0, '']));
    for (const n of names) expect(await sha256(path.join(outDir, n))).toBe(sums.get(n));
  });

  it('a hostile guest’s tar cannot write outside the host destination (the guest replaced its tar)', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'evil', command: ['sleep', '600'], network: 'none' });
    const outside = path.join(work, 'outside');
    mkdirSync(outside);
    writeFileSync(path.join(outside, 'victim'), 'untouched');
    // What the guest will send instead of a real archive.
    const pack = tar.pack();
    const entries: [Partial<tar.Header> & { name: string }, string][] = [
      [{ name: 'loot/../../outside/victim' }, 'escaped'],
      [{ name: 'loot/esc', type: 'symlink', linkname: outside }, ''],
      [{ name: 'loot/esc/victim' }, 'through a symlink'],
      [{ name: 'loot/esc/new' }, 'through a symlink'],
      [{ name: 'loot/hard', type: 'link', linkname: path.join(outside, 'victim') }, ''],
      [{ name: 'loot/dev', type: 'block-device', devmajor: 8, devminor: 0 }, ''],
      [{ name: 'loot/suid', mode: 0o4755 }, '#!/bin/sh\n'],
      [{ name: 'loot/fine.txt' }, 'inside'],
    ];
    for (const [h, body] of entries) pack.entry(h, body);
    pack.finalize();
    const chunks: Buffer[] = [];
    for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
    await d.client.writeFile('evil', '/evil.tar', Buffer.concat(chunks));
    // The workload is root in its VM: it swaps in a `tar` that prints the evil archive.
    const swap = await d.cli([
      'exec',
      'evil',
      '--',
      'sh',
      '-c',
      "printf '#!/bin/sh\\ncat /evil.tar\\n' > /usr/bin/tar && chmod 755 /usr/bin/tar && mkdir /loot",
    ]);
    expect(swap.code).toBe(0);
    const dest = path.join(work, 'dest');
    mkdirSync(dest);
    const r = await d.cli(['cp', 'evil:/loot', dest]);
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/skipped loot\/\.\.\/\.\.\/outside\/victim: a "\.\." in its name/);
    expect(readFileSync(path.join(outside, 'victim'), 'utf8')).toBe('untouched');
    expect(readdirSync(outside)).toEqual(['victim']);
    expect(readlinkSync(path.join(dest, 'loot', 'esc'))).toBe(outside); // a link, kept as a link
    expect(lstatSync(path.join(dest, 'loot', 'dev'), { throwIfNoEntry: false })).toBeUndefined();
    expect(lstatSync(path.join(dest, 'loot', 'hard'), { throwIfNoEntry: false })).toBeUndefined();
    expect(statSync(path.join(dest, 'loot', 'suid')).mode & 0o7777).toBe(0o755);
    expect(readFileSync(path.join(dest, 'loot', 'fine.txt'), 'utf8')).toBe('inside');
  });
});

describe('files API', () => {
  it('writes, reads, stats, lists, makes and removes through the typed client; coded errors', async () => {
    const d = daemon();
    const c = d.client;
    await c.createInstance({ handle: 'api', command: ['sleep', '600'], network: 'none' });
    expect(await c.makeDirectory('api', '/data/nested', { parents: true })).toMatchObject({ name: 'nested', type: 'directory' });
    const st = await c.writeFile('api', '/data/nested/hello.txt', 'hello files\n', { mode: 0o640 });
    expect(st).toMatchObject({ name: 'hello.txt', type: 'file', size: 12, mode: 0o640, uid: 0 });
    const got = await c.readFile('api', '/data/nested/hello.txt');
    expect(got.size).toBe(12);
    expect(got.mode).toBe(0o640);
    const chunks: Buffer[] = [];
    for await (const ch of got.data as AsyncIterable<Buffer>) chunks.push(ch);
    expect(Buffer.concat(chunks).toString()).toBe('hello files\n');
    // A stream of unknown length works too.
    await c.writeFile('api', '/data/streamed', Readable.from([Buffer.from('a'), Buffer.from('b')]));
    expect((await d.cli(['exec', 'api', '--', 'cat', '/data/streamed'])).stdout).toBe('ab');
    expect((await c.listFiles('api', '/data/nested')).map((e) => [e.name, e.type])).toEqual([['hello.txt', 'file']]);
    await d.cli(['exec', 'api', '--', 'ln', '-s', '/etc/hostname', '/data/link']);
    expect(await c.statFile('api', '/data/link')).toMatchObject({ type: 'symlink', linkTarget: '/etc/hostname' });

    await expect(c.readFile('api', '/data/nope')).rejects.toMatchObject({
      code: 'NOT_FOUND',
      message: '/data/nope: no such file or directory',
    });
    await expect(c.readFile('api', '/data')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(c.removeFile('api', '/data')).rejects.toMatchObject({ code: 'FAILED_PRECONDITION', message: /not empty/ });
    await c.removeFile('api', '/data', { recursive: true });
    await expect(c.statFile('api', '/data')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(c.writeFile('api', '/no/dir/x', 'x')).rejects.toMatchObject({ code: 'NOT_FOUND' });

    await c.pauseInstance('api');
    await expect(c.statFile('api', '/etc')).rejects.toMatchObject({
      code: 'FAILED_PRECONDITION',
      message: /it is paused; resume it first/,
    });
    await c.resumeInstance('api');
    await c.stopInstance('api', { timeoutMs: 1000 });
    const stopped = await d.cli(['cp', 'api:/etc/hostname', work]);
    expect(stopped.stderr).toMatch(/it is stopped; start it again with aegis start api.*\[FAILED_PRECONDITION\]/);
    await expect(c.statFile('nosuch', '/etc')).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });
});
