/**
 * Volumes on real VMs: host directories (9p, mapped-xattr) and named volumes (ext4 disks),
 * through the CLI as a user types them (`-v`, `aegis volume …`). The escape attempts run as
 * root in the guest, which is what a workload is.
 */
import { execFileSync } from 'node:child_process';
import {
  chmodSync,
  chownSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Instance, Volume } from '@aegis/client';
import { buildStaticImage, exportDockerArchive, STATIC_IMAGE } from '../support/oci-images.js';
import { artifacts, teardown, TestDaemon, useDaemon, type CliResult } from './fixture.js';

const daemon = useDaemon();
const work = mkdtempSync('/tmp/aegis-volumes-');
afterAll(() => rmSync(work, { recursive: true, force: true }));

let n = 0;
/** A fresh host directory (outside the daemon's home) holding `files`. */
function hostDir(files: Record<string, string> = {}): string {
  const dir = path.join(work, `share${++n}`);
  mkdirSync(dir);
  for (const [name, content] of Object.entries(files)) writeFileSync(path.join(dir, name), content);
  return dir;
}

function ok(r: CliResult): string {
  if (r.code !== 0) throw new Error(`exit ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r.stdout;
}

const sh = (script: string): string[] => ['--', 'sh', '-c', script];

describe('host directories (-v HOST:GUEST)', () => {
  it('shares a directory read-write: the guest reads the host files, and what it writes lands on the host, owned by the host user', async () => {
    const d = daemon();
    const dir = hostDir({ 'in.txt': 'from the host\n' });
    const out = ok(
      await d.cli([
        'run',
        '-v',
        `${dir}:/work`,
        '-w',
        '/work',
        ...sh('cat in.txt; echo from the guest > out.txt; mkdir -p sub/deeper && echo nested > sub/deeper/f; stat -c "%u %a" out.txt'),
      ]),
    );
    expect(out).toBe('from the host\n0 644\n');
    expect(readFileSync(path.join(dir, 'out.txt'), 'utf8')).toBe('from the guest\n');
    expect(readFileSync(path.join(dir, 'sub/deeper/f'), 'utf8')).toBe('nested\n');
    for (const f of ['out.txt', 'sub', 'sub/deeper/f']) {
      const st = statSync(path.join(dir, f));
      // aegisd runs as this test's user (root here: then root is "the host user").
      expect([st.uid, st.gid]).toEqual([process.getuid?.(), process.getgid?.()]);
    }
    expect(statSync(path.join(dir, 'out.txt')).mode & 0o7777).toBe(0o644);
    expect(statSync(path.join(dir, 'sub')).mode & 0o7777).toBe(0o755);
  });

  it(':ro refuses every write, and the host directory is left as it was', async () => {
    const d = daemon();
    const dir = hostDir({ 'keep.txt': 'unchanged\n' });
    const r = await d.cli([
      'run',
      '-v',
      `${dir}:/src:ro`,
      ...sh(
        'cat /src/keep.txt; echo x >> /src/keep.txt; echo x > /src/new; mkdir /src/d; rm /src/keep.txt; echo "still $(cat /src/keep.txt)"',
      ),
    ]);
    expect(r.stdout).toBe('unchanged\nstill unchanged\n');
    expect(r.stderr.match(/Read-only file system/g)?.length).toBe(4);
    expect(execFileSync('ls', ['-A', dir]).toString()).toBe('keep.txt\n');
    expect(readFileSync(path.join(dir, 'keep.txt'), 'utf8')).toBe('unchanged\n');
  });

  it('cannot be used to reach outside the directory: symlinks out, .., hard links, device nodes and setuid files stay inside', async () => {
    const d = daemon();
    const outside = path.join(work, `outside${++n}`);
    mkdirSync(outside);
    const secret = path.join(outside, 'secret.txt');
    writeFileSync(secret, 'host secret\n');
    const dir = hostDir({ 'plain.txt': 'plain\n' });
    // Left by the host user in the shared directory: links that point out of it.
    symlinkSync(secret, path.join(dir, 'host-link'));
    symlinkSync(outside, path.join(dir, 'host-dir-link'));
    symlinkSync('../../..', path.join(dir, 'up-link'));
    const script = [
      // A symlink the host made, followed from the guest, resolves in the guest's own tree.
      `cat /work/host-link 2>/dev/null || echo "host-link: nothing"`,
      `echo pwned > /work/host-link 2>/dev/null || echo "host-link: no write"`,
      `ls /work/host-dir-link/ 2>/dev/null || echo "host-dir-link: nothing"`,
      `echo pwned > /work/host-dir-link/secret.txt 2>/dev/null || echo "host-dir-link: no write"`,
      // A symlink the guest makes, pointing at the host file, then written through.
      `ln -s ${secret} /work/guest-link && (echo pwned > /work/guest-link) 2>/dev/null || echo "guest-link: no write"`,
      `ln -s ${outside} /work/guest-dir-link && (echo pwned > /work/guest-dir-link/new.txt) 2>/dev/null || echo "guest-dir-link: no write"`,
      // .. at the top of the share is the guest's own parent directory.
      `echo pwned > /work/../escaped-by-dotdot; ls /work/../../.. | grep -qx aegis && echo "dotdot: guest root"`,
      // (mapped-xattr reads a link's target from its file's content: a host symlink has none, so it is never followed)
      `echo pwned > /work/up-link/escaped-by-up-link 2>/dev/null || echo "up-link: not followed"`,
      // Hard links: to a file outside the share (cross-device in the guest), and to the host's symlink.
      `ln /etc/passwd /work/hard 2>/dev/null || echo "hard link out: refused"`,
      `ln /work/host-link /work/hard-to-link 2>/dev/null; cat /work/hard-to-link 2>/dev/null || echo "hard-to-link: nothing"`,
      // Device nodes, a FIFO, and a setuid-root copy of a shell.
      `mknod /work/disk b 8 0 && mknod /work/mem c 1 1 && mkfifo /work/fifo && echo "nodes made"`,
      `cp /bin/sh /work/suid-sh && chown 0:0 /work/suid-sh && chmod 6755 /work/suid-sh && stat -c "guest sees %a %u" /work/suid-sh`,
    ].join('\n');
    const out = ok(await d.cli(['run', '--name', 'escape', '-v', `${dir}:/work`, ...sh(script)]));
    expect(out.split('\n')).toEqual([
      'host-link: nothing',
      'host-link: no write',
      'host-dir-link: nothing',
      'host-dir-link: no write',
      'guest-link: no write',
      'guest-dir-link: no write',
      'dotdot: guest root',
      'up-link: not followed',
      'hard link out: refused',
      'hard-to-link: nothing',
      'nodes made',
      'guest sees 6755 0',
      '',
    ]);
    expect(out).not.toContain('host secret');
    // The host side: nothing outside the share changed.
    expect(readFileSync(secret, 'utf8')).toBe('host secret\n');
    expect(statSync(secret).nlink).toBe(1);
    expect(execFileSync('ls', ['-A', outside]).toString()).toBe('secret.txt\n');
    for (const p of [path.join(work, 'escaped-by-dotdot'), path.join(path.dirname(work), 'escaped-by-up-link'), '/escaped-by-up-link']) {
      expect(() => lstatSync(p)).toThrow();
    }
    // What the guest made inside is plain data on the host: no symlinks, devices, FIFOs or
    // set-id bits (mapped-xattr keeps the guest's view in user.virtfs.* xattrs).
    for (const f of ['guest-link', 'guest-dir-link', 'disk', 'mem', 'fifo', 'suid-sh']) {
      const st = lstatSync(path.join(dir, f));
      expect({ f, file: st.isFile() }).toEqual({ f, file: true });
      expect(st.mode & 0o7777).toBe(0o644);
      expect(st.uid).toBe(process.getuid?.());
    }
    expect(readFileSync(path.join(dir, 'guest-link'), 'utf8')).toBe(secret);
    // The host's own symlinks are still symlinks, and still point where the host user put them.
    expect(lstatSync(path.join(dir, 'host-link')).isSymbolicLink()).toBe(true);
  });

  it("refuses a missing host path, a file, a reserved guest path, AEGIS_HOME and the guest's artifacts before anything boots", async () => {
    const d = daemon();
    const file = path.join(hostDir({ f: 'x' }), 'f');
    const missing = await d.cli(['run', '-v', `${work}/nope:/x`, '--', 'true']);
    expect(missing.stderr).toMatch(/host path .*nope does not exist \[NOT_FOUND\]/);
    expect((await d.cli(['run', '-v', `${file}:/x`, '--', 'true'])).stderr).toMatch(/is not a directory.*\[INVALID_ARGUMENT\]/);
    expect((await d.cli(['run', '-v', `${work}:/proc/x`, '--', 'true'])).stderr).toMatch(
      /--volume #0 \/proc\/x is reserved.*\[INVALID_ARGUMENT\]/,
    );
    expect((await d.cli(['run', '-v', `${d.home}:/x`, '--', 'true'])).stderr).toMatch(/overlaps AEGIS_HOME.*\[INVALID_ARGUMENT\]/);
    const rootfsDir = path.dirname(artifacts().rootfs);
    expect((await d.cli(['run', '-v', `${rootfsDir}:/x:ro`, '--', 'true'])).stderr).toMatch(
      /overlaps the guest rootfs.*\[INVALID_ARGUMENT\]/,
    );
    expect((await d.cli(['run', '-v', 'some/dir:/x', '--', 'true'])).stderr).toMatch(/must be an absolute path or start with \.\//);
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });
});

describe('named volumes (-v NAME:GUEST, aegis volume)', () => {
  it('creates a volume on first use, keeps its data across instances and an aegisd restart, and shows it', async () => {
    const d = daemon();
    ok(await d.cli(['run', '-v', 'keep:/data', ...sh('echo first > /data/f; mkdir /data/dir')]));
    const list = JSON.parse(ok(await d.cli(['volume', 'ls', '--json']))) as Volume[];
    expect(list).toEqual([expect.objectContaining({ name: 'keep', sizeMiB: 1024, usedBy: [] })]);
    expect(ok(await d.cli(['run', '-v', 'keep:/other/place', '--', 'cat', '/other/place/f']))).toBe('first\n');
    await d.stop();
    await d.start();
    expect(ok(await d.cli(['run', '-v', 'keep:/data', ...sh('cat /data/f; ls /data')]))).toBe('first\ndir\nf\nlost+found\n');
    expect(ok(await d.cli(['volume', 'ls']))).toMatch(/^NAME +SIZE +USED +CREATED +INSTANCES\nkeep +1 GiB /);
  });

  it('volume create takes --size, is idempotent like docker, and refuses another size', async () => {
    const d = daemon();
    expect(ok(await d.cli(['volume', 'create', 'sized', '--size', '64m']))).toBe('sized\n');
    expect(ok(await d.cli(['volume', 'create', 'sized']))).toBe('sized\n');
    const again = await d.cli(['volume', 'create', 'sized', '--size', '1g']);
    expect(again.stderr).toMatch(/already exists with 64 MiB.*\[ALREADY_EXISTS\]/);
    const [v] = JSON.parse(ok(await d.cli(['volume', 'inspect', 'sized']))) as Volume[];
    expect(v).toMatchObject({ name: 'sized', sizeMiB: 64 });
    expect(ok(await d.cli(['run', '-v', 'sized:/s', ...sh('df -m /s | tail -1')]))).toMatch(/^\/dev\/vdc +\d+ /);
    expect((await d.cli(['volume', 'create', '../bad'])).stderr).toContain('[INVALID_ARGUMENT]');
    expect((await d.cli(['volume', 'inspect', 'nope'])).stderr).toContain('[NOT_FOUND]');
  });

  it('refuses rm while an instance names the volume, running or stopped; then removes it and its file', async () => {
    const d = daemon();
    ok(await d.cli(['instance', 'start', '--name', 'holder', '-v', 'busy:/b', '--', 'sleep', '600']));
    const refused = await d.cli(['volume', 'rm', 'busy']);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toMatch(/volume "busy" is used by instance "holder" \(running\); delete it first \[FAILED_PRECONDITION\]/);
    ok(await d.cli(['instance', 'stop', 'holder']));
    expect((await d.cli(['volume', 'rm', 'busy'])).stderr).toMatch(/"holder" \(stopped\).*\[FAILED_PRECONDITION\]/);
    ok(await d.cli(['instance', 'delete', 'holder']));
    expect(ok(await d.cli(['volume', 'rm', 'busy']))).toBe('busy\n');
    expect((await d.cli(['volume', 'inspect', 'busy'])).stderr).toContain('[NOT_FOUND]');
    expect(() => statSync(path.join(d.home, 'volumes', 'busy.ext4'))).toThrow();
  });

  it('has one writer and no other user, or any number of readers', async () => {
    const d = daemon();
    ok(await d.cli(['instance', 'start', '--name', 'writer', '-v', 'shared:/s', '--', 'sleep', '600']));
    const second = await d.cli(['run', '-v', 'shared:/s', '--', 'true']);
    expect(second.code).toBe(125);
    expect(second.stderr).toMatch(
      /volume "shared" is attached read-write to instance "writer"; a volume has one writer.*\[FAILED_PRECONDITION\]/,
    );
    expect((await d.cli(['run', '-v', 'shared:/s:ro', '--', 'true'])).stderr).toMatch(/attached read-write to instance "writer"/);
    ok(await d.cli(['exec', 'writer', ...sh('echo written > /s/f; sync')]));
    ok(await d.cli(['instance', 'stop', 'writer']));
    // Stopped, it holds nothing: two readers at once.
    ok(await d.cli(['instance', 'start', '--name', 'r1', '-v', 'shared:/s:ro', '--', 'sleep', '600']));
    ok(await d.cli(['instance', 'start', '--name', 'r2', '-v', 'shared:/s:ro', '--', 'sleep', '600']));
    expect(ok(await d.cli(['exec', 'r2', '--', 'cat', '/s/f']))).toBe('written\n');
    expect((await d.cli(['exec', 'r1', ...sh('echo x > /s/f')])).stderr).toContain('Read-only file system');
    expect((await d.cli(['instance', 'restart', 'writer'])).stderr).toMatch(/attached read-only to "r1", "r2".*\[FAILED_PRECONDITION\]/);
  });

  it('refuses to run the workload when a volume cannot be mounted, saying which', async () => {
    const d = daemon();
    ok(await d.cli(['volume', 'create', 'broken', '--size', '16m']));
    // Not an ext4 file system any more (the host never reads it; the guest finds out).
    writeFileSync(path.join(d.home, 'volumes', 'broken.ext4'), Buffer.alloc(16 << 20));
    const r = await d.cli(['run', '-v', 'broken:/b', '--', 'echo', 'should not run']);
    expect(r.code).toBe(125);
    expect(r.stdout).toBe('');
    expect(r.stderr).toMatch(/volume \/b: .* \(not mounted\) \[FAILED_PRECONDITION\]/);
  });
});

describe('volumes and the instance lifecycle', () => {
  it('shows volumes in info and list --json, and keeps them through instance restart and an aegisd restart', async () => {
    const d = daemon();
    const dir = hostDir({ 'in.txt': 'host\n' });
    // The volume's mount point, inside a read-only share: the guest cannot make it there.
    mkdirSync(path.join(dir, 'cache'));
    ok(await d.cli(['instance', 'start', '--name', 'life', '-v', `${dir}:/src:ro`, '-v', 'life-cache:/src/cache', '--', 'sleep', '600']));
    const expected = [
      { type: 'bind', source: dir, target: '/src', readOnly: true },
      { type: 'volume', source: 'life-cache', target: '/src/cache', readOnly: false },
    ];
    expect((JSON.parse(ok(await d.cli(['instance', 'info', 'life', '--json']))) as Instance).volumes).toEqual(expected);
    expect((JSON.parse(ok(await d.cli(['instance', 'list', '--json']))) as Instance[])[0]?.volumes).toEqual(expected);
    expect(ok(await d.cli(['instance', 'info', 'life']))).toContain(`Volumes:   ${dir}:/src:ro, life-cache:/src/cache\n`);
    // Mounted parent first: the volume is inside the read-only share and writable.
    ok(await d.cli(['exec', 'life', ...sh('cat /src/in.txt && echo kept > /src/cache/f')]));

    ok(await d.cli(['instance', 'restart', 'life']));
    expect(ok(await d.cli(['exec', 'life', ...sh('cat /src/in.txt /src/cache/f')]))).toBe('host\nkept\n');

    await d.stop();
    await d.start();
    expect((await d.client.getInstance('life')).volumes).toEqual(expected);
    expect(ok(await d.cli(['exec', 'life', '--', 'cat', '/src/cache/f']))).toBe('kept\n');
    // The adopted instance still holds its volume.
    expect((await d.cli(['run', '-v', 'life-cache:/c', '--', 'true'])).stderr).toMatch(/attached read-write to instance "life"/);
  });

  it('boots an instance with volumes cold even when a snapshot template is ready', async () => {
    const d = daemon();
    // The template is built in the background (or found, built by an earlier daemon): wait until an instance restores from it.
    for (let i = 0; ; i++) {
      ok(await d.cli(['run', '--name', `warm-check${i}`, '--', 'true']));
      if (new RegExp(`instance warm-check${i} \\(\\w+\\): warm boot`).test(d.log())) break;
      if (i > 60) throw new Error('no instance was ever restored from a template');
      await new Promise((r) => setTimeout(r, 2000));
    }
    ok(await d.cli(['run', '--name', 'cold-check', '-v', 'coldvol:/v', '--', 'test', '-d', '/v/lost+found']));
    expect(d.log()).toMatch(/instance cold-check \(\w+\): cold boot/);
  });

  it('mounts volumes inside an image root (--image)', async () => {
    const d = daemon();
    const { layoutDir } = await buildStaticImage();
    const tar = path.join(work, 'static.tar');
    await exportDockerArchive(layoutDir, STATIC_IMAGE.ref, tar, 'aegis-test/volumes:1');
    ok(await d.cli(['image', 'import', tar]));
    const dir = hostDir({ 'in.txt': 'into the image\n' });
    const out = await d.cli([
      'run',
      '--image',
      'aegis-test/volumes:1',
      '-v',
      'imgvol:/data',
      '-v',
      `${dir}:/host:ro`,
      ...sh('cat /host/in.txt; echo from-image > /data/f; ls /'),
    ]);
    expect(ok(out)).toMatch(/^into the image\n/);
    // The image's root (busybox only), not ours: the mount points were made inside it.
    expect(out.stdout).toContain('data\n');
    expect(out.stdout).not.toContain('aegis\n');
    expect(ok(await d.cli(['run', '-v', 'imgvol:/x', '--', 'cat', '/x/f']))).toBe('from-image\n');
  });
});

describe('an aegisd that is not root', () => {
  const UID = 65534;
  let d: TestDaemon | undefined;
  let home: string | undefined;
  let failed = false;
  let dir: string;

  beforeAll(async () => {
    // Its own home, and artifacts it can read: hard links to the built ones, which stay root's
    // (a chown through a hard link would change the shared file's owner).
    home = mkdtempSync('/tmp/aegis-it-nobody-');
    const a = artifacts();
    mkdirSync(path.join(home, 'art'));
    for (const f of [a.kernel, a.rootfs]) linkSync(f, path.join(home, 'art', path.basename(f)));
    chownSync(home, UID, UID);
    chownSync(path.join(home, 'art'), UID, UID);
    chmodSync(work, 0o755);
    dir = hostDir({ 'in.txt': 'hi\n' });
    chownSync(dir, UID, UID);
    d = new TestDaemon(
      home,
      {
        AEGIS_KERNEL: path.join(home, 'art', path.basename(a.kernel)),
        AEGIS_ROOTFS: path.join(home, 'art', path.basename(a.rootfs)),
        AEGIS_WARM_BOOT: '0',
      },
      ['setpriv', `--reuid=${UID}`, `--regid=${UID}`, '--clear-groups', '--'],
    );
    await d.start();
  });

  afterAll(async () => {
    if (d) await teardown(d, failed);
    else if (home) rmSync(home, { recursive: true, force: true });
  });

  it("gives what the guest creates to aegisd's user, never to root, and no set-id bits", async () => {
    try {
      const out = ok(
        (await d?.cli(['run', '-v', `${dir}:/w`, ...sh('cat /w/in.txt; echo x > /w/by-root; cp /bin/sh /w/s; chmod 4755 /w/s; id -u')])) ??
          ({ code: 1, stdout: '', stderr: 'no daemon' } as CliResult),
      );
      expect(out).toBe('hi\n0\n');
      for (const f of ['by-root', 's']) {
        const st = statSync(path.join(dir, f));
        expect([f, st.uid, st.gid, st.mode & 0o7777]).toEqual([f, UID, UID, 0o644]);
      }
    } catch (err) {
      failed = true;
      throw err;
    }
  });
});
