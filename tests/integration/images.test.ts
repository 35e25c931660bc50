/**
 * OCI images on real VMs: images built by the tests from Debian packages (tests/support/
 * oci-images.ts), pushed with skopeo to Debian's docker-registry on loopback, pulled and
 * imported by aegisd, and run with the harness in them.
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildGlibcImage, buildStaticImage, exportDockerArchive, GLIBC_IMAGE, STATIC_IMAGE } from '../support/oci-images.js';
import { buildOciLayout, pushOciLayout, registryBlobPath, startRegistry, type TestRegistry } from '../support/registry.js';
import { useDaemon } from './fixture.js';

const dockerConfig = mkdtempSync(path.join(os.tmpdir(), 'aegis-docker-config-'));
const daemon = useDaemon({ DOCKER_CONFIG: dockerConfig });
let registry: TestRegistry;
let glibcLayout: string;
let staticLayout: string;
const work = mkdtempSync(path.join(os.tmpdir(), 'aegis-images-'));

const ref = (name: string): string => `${registry.host}/team/${name}:1`;

beforeAll(async () => {
  [{ layoutDir: glibcLayout }, { layoutDir: staticLayout }] = await Promise.all([buildGlibcImage(), buildStaticImage()]);
  registry = await startRegistry();
  await pushOciLayout(glibcLayout, ref('python'), undefined, GLIBC_IMAGE.refs.root);
  await pushOciLayout(glibcLayout, ref('python-user'), undefined, GLIBC_IMAGE.refs.user);
  await pushOciLayout(staticLayout, ref('static'), undefined, STATIC_IMAGE.ref);
}, 600_000);

afterAll(async () => {
  await registry?.stop();
  rmSync(work, { recursive: true, force: true });
  rmSync(dockerConfig, { recursive: true, force: true });
});

async function blobGets(name: string): Promise<number> {
  return (await registry.log()).split('\n').filter((l) => l.includes(`GET /v2/team/${name}/blobs/`)).length;
}

describe('images', () => {
  it('pulls an image, lists it, runs a command in it; a second pull is a cache hit', async () => {
    const d = daemon();
    const pull = await d.cli(['image', 'pull', ref('python')]);
    expect(pull.stderr).not.toContain('aegis:');
    expect(pull.code).toBe(0);
    const digest = pull.stdout.trim().split('\n').pop();
    expect(digest).toMatch(/^sha256:[0-9a-f]{64}$/);
    const list = JSON.parse((await d.cli(['image', 'list', '--json'])).stdout) as { digest: string; references: string[] }[];
    expect(list).toEqual([expect.objectContaining({ digest, references: [ref('python')] })]);

    const blobsBefore = await blobGets('python');
    const again = await d.cli(['image', 'pull', ref('python')]);
    expect(again.stdout).toContain('up to date');
    expect(await blobGets('python')).toBe(blobsBefore);

    // By digest: the stored image is used as it is, without asking the registry again.
    const manifestGets = async (): Promise<number> =>
      (await registry.log()).split('\n').filter((l) => l.includes('GET /v2/team/python/manifests/')).length;
    const before = await manifestGets();
    const pinned = await d.cli(['run', '--image', `${registry.host}/team/python@${digest ?? ''}`, '--', 'true']);
    expect(pinned.stderr).toBe('');
    expect(pinned.code).toBe(0);
    expect(await manifestGets()).toBe(before);

    const run = await d.cli([
      'run',
      '--image',
      ref('python'),
      '--',
      'python3',
      '-c',
      'import sys, json; print(sum([1, 2]), sys.version_info[0])',
    ]);
    expect(run.stderr).toBe('');
    expect(run.stdout).toBe('3 3\n');
    expect(run.code).toBe(0);
  });

  it('honours whiteouts, opaque directories, ownership, modes, links and the image User', async () => {
    const d = daemon();
    const script = [
      `test -e ${GLIBC_IMAGE.whitedOut} && echo whiteout-ignored || echo whiteout-ok`,
      `cat ${GLIBC_IMAGE.kept} >/dev/null && echo kept-ok`,
      `ls ${GLIBC_IMAGE.opaqueDir}`,
      `stat -c '%u:%g %a' ${GLIBC_IMAGE.ownedFile}`,
      `readlink ${GLIBC_IMAGE.symlink}`,
      `test ${GLIBC_IMAGE.hardlink} -ef ${GLIBC_IMAGE.hardlinkTarget} && echo hardlink-ok`,
      'id -u; id -g; echo $HOME',
    ].join('; ');
    const root = await d.cli(['run', '--image', ref('python'), '--', 'bash', '-c', script]);
    expect(root.stdout.split('\n')).toEqual([
      'whiteout-ok',
      'kept-ok',
      GLIBC_IMAGE.opaqueNew,
      '1000:1000 640',
      '/usr/bin/python3',
      'hardlink-ok',
      '0',
      '0',
      '/root',
      '',
    ]);
    const user = await d.cli([
      'run',
      '--image',
      ref('python-user'),
      '--',
      'bash',
      '-c',
      `id -u; id -g; echo $HOME; cat ${GLIBC_IMAGE.ownedFile}; touch /root/x`,
    ]);
    const lines = user.stdout.split('\n');
    expect(lines.slice(0, 3)).toEqual([String(GLIBC_IMAGE.user.uid), String(GLIBC_IMAGE.user.gid), GLIBC_IMAGE.user.home]);
    expect(user.stderr).toContain('Permission denied'); // /root is not app's
    expect(user.code).not.toBe(0);
  });

  it('runs Entrypoint + Cmd when no command is given, in an image with no libc and no shell', async () => {
    const d = daemon();
    // Not pulled yet: run pulls it first, and says so (plain lines: stderr is not a terminal).
    const r = await d.cli(['run', '--image', ref('static')]);
    expect(r.stderr).toMatch(new RegExp(`^Unable to find image '${ref('static')}' locally\\npreparing filesystem for [0-9a-f]{12}\\n$`));
    expect(r.stdout).toBe('hello from a static image\n');
    expect(r.code).toBe(0);
    // A command replaces Cmd; the Entrypoint (busybox) stays in front.
    const r2 = await d.cli(['run', '--image', ref('static'), '--', 'echo', 'replaced']);
    expect(r2.stdout).toBe('replaced\n');
    const sh = await d.cli(['run', '--image', ref('static'), '--', 'sh', '-c', 'echo x']);
    expect(sh.stdout).toBe('x\n'); // busybox's own sh applet: still no /bin/sh in the image
  });

  it('pull --json prints each progress event as a JSON line; -u picks a user of the image', async () => {
    const d = daemon();
    await pushOciLayout(staticLayout, ref('static-json'), undefined, STATIC_IMAGE.ref);
    const pull = await d.cli(['image', 'pull', '--json', ref('static-json')]);
    expect(pull.code).toBe(0);
    const events = pull.stdout
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { type: string; cached?: boolean });
    expect(events[0]?.type).toBe('resolved');
    expect(events.some((e) => e.type === 'progress')).toBe(true);
    const done = events.at(-1) as { type: string; image?: { references: string[] } };
    expect(done.type).toBe('done');
    expect(done.image?.references).toContain(ref('static-json'));
    const bad = await d.cli(['image', 'pull', '--json', `${registry.host}/team/nosuch:1`]);
    expect(bad.code).not.toBe(0);
    expect(JSON.parse(bad.stdout.trim().split('\n').at(-1) ?? '')).toMatchObject({ error: { code: 'NOT_FOUND' } });
    // The image's User is app; -u overrides it, by name or number, as docker run -u does.
    const asRoot = await d.cli(['run', '-u', 'root', '--image', ref('python-user'), '--', 'id', '-un']);
    expect(asRoot.stdout).toBe('root\n');
    const byId = await d.cli(['run', '-u', '1000:0', '--image', ref('python-user'), '--', 'sh', '-c', 'id -un; id -g']);
    expect(byId.stdout).toBe('app\n0\n');
    const none = await d.cli(['run', '-u', 'nobody-here', '--image', ref('python-user'), '--', 'true']);
    expect(none.code).toBe(125);
    expect(none.stderr).toMatch(/unable to find user nobody-here/);
  });

  it("files and cp in an --image instance are the image root's; an absolute symlink resolves inside it", async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'imgf', image: ref('python'), command: ['sleep', '600'], network: 'none' });
    await d.client.writeFile('imgf', '/opt/fixture/from-host.txt', 'written by the host\n');
    expect((await d.cli(['exec', 'imgf', '--', 'cat', '/opt/fixture/from-host.txt'])).stdout).toBe('written by the host\n');
    const out = path.join(work, 'img-out');
    expect((await d.cli(['cp', `imgf:${GLIBC_IMAGE.kept}`, out])).code).toBe(0);
    expect(readFileSync(out, 'utf8')).toBe('the upper layer keeps this\n');
    // /usr/local/bin/py -> /usr/bin/python3: the image's python, not the base root's (which has none).
    const viaLink = await d.client.readFile('imgf', GLIBC_IMAGE.symlink);
    viaLink.data.resume();
    expect(viaLink.size).toBe((await d.client.statFile('imgf', '/usr/bin/python3.11')).size);
    expect(await d.client.statFile('imgf', GLIBC_IMAGE.symlink)).toMatchObject({ type: 'symlink', linkTarget: '/usr/bin/python3' });
    await expect(d.client.statFile('imgf', '/aegis')).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('imports a docker save archive and runs it', async () => {
    const d = daemon();
    const tar = path.join(work, 'static.tar');
    await exportDockerArchive(staticLayout, STATIC_IMAGE.ref, tar, 'aegis-test/imported:2');
    const r = await d.cli(['image', 'import', tar]);
    expect(r.stderr).toBe('');
    expect(r.stdout).toMatch(/^docker\.io\/aegis-test\/imported:2 sha256:[0-9a-f]{64}\n$/);
    const run = await d.cli(['run', '--image', 'aegis-test/imported:2', '--', 'echo', 'from-archive']);
    expect(run.stdout).toBe('from-archive\n');
  });

  it('prepares an image once: the second instance shares it, each writes to its own layer', async () => {
    const d = daemon();
    const preparedBefore = d.log().match(/filesystem prepared/g)?.length ?? 0;
    await d.client.createInstance({ handle: 'a', image: ref('python'), command: ['sleep', '600'] });
    await d.client.createInstance({ handle: 'b', image: ref('python'), command: ['sleep', '600'] });
    await d.cli(['exec', 'a', '--', 'sh', '-c', 'echo mine > /etc/only-in-a']);
    const b = await d.cli(['exec', 'b', '--', 'sh', '-c', 'cat /etc/only-in-a 2>/dev/null || echo absent']);
    expect(b.stdout).toBe('absent\n');
    // Pulled (and prepared) by the first test; python-user shares its layers, so its filesystem too.
    expect(d.log().match(/filesystem prepared/g)?.length ?? 0).toBe(preparedBefore);
    const info = await d.client.getInstance('a');
    expect(info.image).toBe(ref('python'));
    expect((await d.cli(['instance', 'list'])).stdout).toMatch(
      new RegExp(`^a\\s+\\S+\\s+running\\s+${ref('python').replace(/\./g, '\\.')}\\s`, 'm'),
    );
    expect((await d.cli(['instance', 'info', 'a'])).stdout).toMatch(
      new RegExp(`Image:\\s+${ref('python').replace(/\./g, '\\.')} \\(sha256:`),
    );
    // Refused while in use; allowed once the instances are gone.
    const rm = await d.cli(['image', 'rm', ref('python')]);
    expect(rm.stderr).toMatch(/in use by instance [ab].*\[FAILED_PRECONDITION\]/);
    await d.client.deleteInstance('a', { force: true });
    await d.client.deleteInstance('b', { force: true });
    const rm2 = await d.cli(['image', 'rm', ref('python')]);
    expect(rm2.stdout).toMatch(/deleted: sha256:/);
    expect((await d.client.listImages()).map((i) => i.references).flat()).not.toContain(ref('python'));
  });

  it('rejects a blob that does not match its digest, and keeps no broken image', async () => {
    const d = daemon();
    // A layer of its own: a blob the store already has would never be fetched.
    const built = await buildOciLayout(path.join(work, 'corrupt-src'), {
      tag: 'corrupt',
      layers: [[{ name: 'etc/unique', data: `corrupt-test ${Date.now()}\n` }]],
      cmd: ['/bin/true'],
    });
    await pushOciLayout(path.join(work, 'corrupt-src'), ref('corrupt'), undefined, 'corrupt');
    const layer = built.layerDigests[0] ?? '';
    const blob = registryBlobPath(registry, layer);
    const bytes = readFileSync(blob);
    const mid = bytes.length >> 1;
    bytes[mid] = (bytes[mid] ?? 0) ^ 0xff;
    writeFileSync(blob, bytes);
    const r = await d.cli(['image', 'pull', ref('corrupt')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/digest.*\[INVALID_ARGUMENT\]/i);
    expect((await d.client.listImages()).map((i) => i.references).flat()).not.toContain(ref('corrupt'));
    const run = await d.cli(['run', '--image', ref('corrupt'), '--', 'true']);
    expect(run.code).not.toBe(0);
    expect(d.instanceDirs()).toEqual([]);
  });

  it('does the work once when the same image is pulled twice at the same time', async () => {
    const d = daemon();
    const src = path.join(work, 'concurrent-src');
    const built = await buildOciLayout(src, {
      tag: 'twice',
      layers: [[{ name: 'etc/payload', data: `${'x'.repeat(4 << 20)} ${Date.now()}\n` }]],
      cmd: ['/bin/true'],
    });
    await pushOciLayout(src, ref('twice'), undefined, 'twice');
    const [a, b] = await Promise.all([d.cli(['image', 'pull', ref('twice')]), d.cli(['image', 'pull', ref('twice')])]);
    expect([a.code, b.code]).toEqual([0, 0]);
    const layerGets = (await registry.log())
      .split('\n')
      .filter((l) => l.includes(`GET /v2/team/twice/blobs/${built.layerDigests[0] ?? ''}`));
    expect(layerGets.length).toBe(1);
    expect(d.log().match(new RegExp(`image ${built.manifestDigest}: filesystem prepared`, 'g'))?.length).toBe(1);
  });

  it('answers a registry token challenge with the credentials in the Docker config', async () => {
    const d = daemon();
    const creds = { user: 'agent', password: 'pull-secret-7x' };
    const auth = await startRegistry({ tokenAuth: creds });
    try {
      await pushOciLayout(staticLayout, `${auth.host}/team/private:1`, creds, STATIC_IMAGE.ref);
      const denied = await d.cli(['image', 'pull', `${auth.host}/team/private:1`]);
      expect(denied.stderr).toMatch(/\[FAILED_PRECONDITION\]/);
      expect(denied.stderr).not.toContain(creds.password);
      const basic = Buffer.from(`${creds.user}:${creds.password}`).toString('base64');
      writeFileSync(path.join(dockerConfig, 'config.json'), JSON.stringify({ auths: { [auth.host]: { auth: basic } } }));
      const ok = await d.cli(['image', 'pull', `${auth.host}/team/private:1`]);
      expect(ok.stderr).not.toContain('aegis:');
      expect(ok.code).toBe(0);
      const run = await d.cli(['run', '--image', `${auth.host}/team/private:1`, '--', 'echo', 'authorized']);
      expect(run.stdout).toBe('authorized\n');
    } finally {
      await auth.stop();
    }
  });
});
