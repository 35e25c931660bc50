/**
 * Guest networking and the egress policy on real VMs. The daemon (and so QEMU) runs in a
 * network namespace of its own whose "internet" is a second namespace
 * (tests/support/netns-world.mjs, netns-internet.mjs): a public server, a second one, a cloud
 * metadata address, a LAN host and a DNS server that also answers a public name with a private
 * address. Nothing a guest sends leaves the machine; the host-loopback and host-address
 * services it must not reach are real servers of the daemon's namespace.
 */
import { createHash } from 'node:crypto';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { buildGlibcImage, exportDockerArchive, GLIBC_IMAGE } from '../support/oci-images.js';
import { ROOT, useDaemon } from './fixture.js';

const world = ['unshare', '--net', '--mount', process.execPath, path.join(ROOT, 'tests/support/netns-world.mjs')];
const daemon = useDaemon({}, world);

/**
 * Fetches each URL from inside the guest; prints `URL -> body` or `URL -> ERROR kind`, where a
 * refusal names its cause (reset, refused, no such name) and a hang shows as `timeout`.
 * `tls:HOST:PORT:SNI` opens TLS to HOST with server name SNI (no certificate check) and GETs /.
 */
const FETCH = `
import socket, ssl, sys, urllib.request
def kind(e):
    r = getattr(e, 'reason', None)
    e = r if isinstance(r, BaseException) else e
    if isinstance(e, socket.timeout) or 'timed out' in str(e): return 'timeout'
    if isinstance(e, socket.gaierror): return 'noname'
    if isinstance(e, (ConnectionResetError, ConnectionRefusedError, ConnectionAbortedError, BrokenPipeError, ssl.SSLError)) or 'reset' in str(e) or 'EOF' in str(e) or 'closed' in str(e) or 'Remote end' in str(e): return 'refused'
    return type(e).__name__
for url in sys.argv[1:]:
    try:
        if url.startswith('tls:'):
            _, host, port, sni = url.split(':')
            ctx = ssl.create_default_context(); ctx.check_hostname = False; ctx.verify_mode = ssl.CERT_NONE
            with socket.create_connection((host, int(port)), timeout=4) as raw, ctx.wrap_socket(raw, server_hostname=sni) as s:
                s.sendall(b'GET / HTTP/1.0\\r\\nHost: ' + sni.encode() + b'\\r\\n\\r\\n')
                body = s.recv(4096).decode().split('\\r\\n\\r\\n', 1)[-1].strip()
        else:
            body = urllib.request.urlopen(url, timeout=4).read().decode().strip()
        print(url, '->', body)
    except Exception as e:
        print(url, '->', 'ERROR', kind(e))
`;
const fetchScript = (urls: string[]): string[] => ['python3', '-c', FETCH, ...urls];

/** `URL -> result` lines as a map. */
function results(stdout: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const line of stdout.trim().split('\n')) {
    const [url, result] = line.split(' -> ');
    if (url && result !== undefined) out[url] = result;
  }
  return out;
}

describe('guest network', () => {
  it('reaches the outside by address and by name (DNS through the user-mode stack)', async () => {
    const r = await daemon().cli(['run', '--', ...fetchScript(['http://192.0.2.1:8081/', 'http://example.test:8081/'])]);
    expect(r.stderr).toBe('');
    expect(r.stdout).toContain('http://192.0.2.1:8081/ -> outside-ok');
    expect(r.stdout).toContain('http://example.test:8081/ -> outside-ok');
    expect(r.code).toBe(0);
  });

  it("cannot reach the host's loopback services through the gateway", async () => {
    // 8082 listens on the host's 127.0.0.1 only; 8081 on every host address. Through the
    // gateway neither may answer (slirp, or passt without --no-map-gw, would hand both over).
    // The last URL is the positive control: the same code does reach the outside server.
    const r = await daemon().cli([
      'run',
      '--',
      ...fetchScript(['http://10.0.2.2:8082/', 'http://10.0.2.2:8081/', 'http://127.0.0.1:8082/', 'http://192.0.2.1:8081/']),
    ]);
    expect(r.stdout).not.toContain('loopback-secret');
    expect(r.stdout).toMatch(/10\.0\.2\.2:8082\/ -> ERROR/);
    expect(r.stdout).toMatch(/10\.0\.2\.2:8081\/ -> ERROR/);
    expect(r.stdout).toMatch(/127\.0\.0\.1:8082\/ -> ERROR/);
    expect(r.stdout).toContain('http://192.0.2.1:8081/ -> outside-ok');
  });

  it('--network none leaves the guest with lo only, and offline', async () => {
    const r = await daemon().cli([
      'run',
      '--network',
      'none',
      '--',
      'sh',
      '-c',
      'ls /sys/class/net; python3 -c "import socket; socket.create_connection((\'192.0.2.1\', 8081), timeout=3)" 2>/dev/null || echo offline',
    ]);
    expect(r.stdout.trim().split('\n')).toEqual(['lo', 'offline']);
    expect(r.code).toBe(0);
    const i = await daemon().client.createInstance({ command: ['sleep', '60'], network: 'none' });
    expect(i.network).toBe('none');
    expect((await daemon().cli(['instance', 'info', i.handle])).stdout).toMatch(/Network:\s+none/);
  });

  it('the default network is user-mode, shown in info; the data link beside eth0 has no address', async () => {
    const i = await daemon().client.createInstance({ command: ['sleep', '60'] });
    expect(i.network).toBe('user');
    const r = await daemon().cli(['exec', i.handle, '--', 'sh', '-c', 'ls /sys/class/net; cat /etc/resolv.conf; ip -o addr show aegisdl']);
    expect(r.stdout).toBe('aegisdl\neth0\nlo\nnameserver 10.0.2.3\n');
  });

  it('by default: the public internet works; private, metadata, host, loopback and rebinding names are refused fast', async () => {
    const r = await daemon().cli([
      'run',
      '--name',
      'egress-default',
      '--',
      'sh',
      '-c',
      `python3 -c "$0" "$@"; python3 -c "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3); s.connect(('192.0.2.1', 9999)); s.send(b'x'); s.recv(1)" 2>&1 | tail -1`,
      FETCH,
      'http://192.0.2.1:8081/',
      'http://example.test:8081/',
      'http://10.99.0.5:8081/',
      'http://169.254.169.254:8081/',
      'http://rebind.test:8081/',
      'http://meta.test:8081/',
      'http://192.0.2.2:8084/',
      'http://10.0.2.2:8084/',
    ]);
    const got = results(r.stdout);
    expect(got).toEqual({
      'http://192.0.2.1:8081/': 'outside-ok',
      'http://example.test:8081/': 'outside-ok',
      'http://10.99.0.5:8081/': 'ERROR refused',
      'http://169.254.169.254:8081/': 'ERROR refused',
      'http://rebind.test:8081/': 'ERROR noname',
      'http://meta.test:8081/': 'ERROR noname',
      'http://192.0.2.2:8084/': 'ERROR refused',
      'http://10.0.2.2:8084/': 'ERROR refused',
    });
    // UDP other than DNS is refused at once in the guest (the send fails), not dropped into a timeout.
    expect(r.stdout).toMatch(/PermissionError|ConnectionRefusedError/);
    expect(r.stdout).not.toMatch(/timed out|TimeoutError/);
    expect(r.code).toBe(0);
  });

  it('--egress-allow: only allowed names (and the private address an allowed name gives), SNI and Host checked', async () => {
    const r = await daemon().cli([
      'run',
      '--egress-allow',
      'example.test',
      '--egress-allow',
      'lan.test:8081',
      '--',
      ...fetchScript([
        'http://example.test:8081/',
        'http://lan.test:8081/',
        'http://second.test:8081/',
        'http://198.51.100.7:8081/',
        'http://10.99.0.5:8081/',
        'tls:example.test:8443:example.test',
        'tls:example.test:8443:other.test',
        'tls:example.test:8443:198.51.100.7',
      ]),
    ]);
    expect(results(r.stdout)).toEqual({
      'http://example.test:8081/': 'outside-ok',
      'http://lan.test:8081/': 'lan-secret',
      'http://second.test:8081/': 'ERROR noname',
      'http://198.51.100.7:8081/': 'ERROR refused',
      // Pinned to lan.test by the answer above, but a request naming the bare address is not a request for lan.test.
      'http://10.99.0.5:8081/': 'ERROR refused',
      'tls:example.test:8443:example.test': 'outside-ok',
      'tls:example.test:8443:other.test': 'ERROR refused',
      'tls:example.test:8443:198.51.100.7': 'ERROR refused',
    });
  });

  it('--egress-deny wins, names answer NXDOMAIN; address rules with ports; shown in egress show with reasons', async () => {
    const d = daemon();
    const i = await d.client.createInstance({
      command: ['sleep', '600'],
      handle: 'egress-deny',
      egress: { allow: ['192.0.2.0/24:8081', 'second.test'], deny: ['second.test', '192.0.2.1:8443'] },
    });
    expect(i.egress).toEqual({ allow: ['192.0.2.0/24:8081', 'second.test'], deny: ['second.test', '192.0.2.1:8443'] });
    const r = await d.cli([
      'exec',
      'egress-deny',
      '--',
      ...fetchScript(['http://192.0.2.1:8081/', 'http://second.test:8081/', 'tls:192.0.2.1:8443:example.test']),
    ]);
    expect(results(r.stdout)).toEqual({
      'http://192.0.2.1:8081/': 'outside-ok',
      'http://second.test:8081/': 'ERROR noname',
      'tls:192.0.2.1:8443:example.test': 'ERROR refused',
    });
    const shown = await d.client.instanceEgress('egress-deny', true);
    expect(shown.mode).toBe('allow-list');
    const log = shown.log ?? [];
    expect(log).toContainEqual(
      expect.objectContaining({ kind: 'dns', name: 'second.test', allowed: false, reason: 'denied by second.test' }),
    );
    expect(log).toContainEqual(
      expect.objectContaining({ kind: 'connect', address: '192.0.2.1', port: 8443, allowed: false, reason: 'denied by 192.0.2.1:8443' }),
    );
    const ok = log.find((e) => e.kind === 'connect' && e.port === 8081 && e.allowed);
    expect(ok?.bytesIn).toBeGreaterThan(0);
    expect(shown.counters).toContainEqual(expect.objectContaining({ destination: '192.0.2.1:8081', allowed: 1 }));
    const text = await d.cli(['egress', 'show', 'egress-deny', '--log']);
    expect(text.stdout).toContain('denied by second.test');
    expect(text.code).toBe(0);
  });

  it('egress allow/deny change a running instance at once ("install, then lock"), and a restart keeps them', async () => {
    const d = daemon();
    await d.client.createInstance({ command: ['sleep', '600'], handle: 'egress-live' });
    const fetch = async (): Promise<Record<string, string>> =>
      results(
        (await d.cli(['exec', 'egress-live', '--', ...fetchScript(['http://second.test:8081/', 'http://example.test:8081/'])])).stdout,
      );
    expect(await fetch()).toEqual({ 'http://second.test:8081/': 'second-ok', 'http://example.test:8081/': 'outside-ok' });
    const locked = await d.cli(['egress', 'allow', 'egress-live', 'example.test']);
    expect(locked.stdout).toContain('allow: example.test');
    expect(await fetch()).toEqual({ 'http://second.test:8081/': 'ERROR noname', 'http://example.test:8081/': 'outside-ok' });
    expect((await d.cli(['egress', 'deny', 'egress-live', 'example.test'])).code).toBe(0);
    expect(await fetch()).toEqual({ 'http://second.test:8081/': 'ERROR noname', 'http://example.test:8081/': 'ERROR noname' });
    await d.client.restartInstance('egress-live');
    expect((await d.client.instanceEgress('egress-live')).deny).toEqual(['example.test']);
    expect(await fetch()).toEqual({ 'http://second.test:8081/': 'ERROR noname', 'http://example.test:8081/': 'ERROR noname' });
  });

  it('--network unfiltered is the whole network the host reaches (no policy); egress rules need the default network', async () => {
    const r = await daemon().cli(['run', '--network', 'unfiltered', '--', ...fetchScript(['http://10.99.0.5:8081/'])]);
    expect(results(r.stdout)).toEqual({ 'http://10.99.0.5:8081/': 'lan-secret' });
    await expect(
      daemon().client.createInstance({ command: ['true'], network: 'none', egress: { allow: ['example.test'] } }),
    ).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
    const bad = await daemon().cli(['run', '--egress-allow', 'not a name', '--', 'true']);
    expect(bad.stderr).toMatch(/egress pattern "not a name"/);
    expect(bad.stderr.trim().split('\n')).toHaveLength(1);
    expect(bad.code).not.toBe(0);
  });

  it('a secret bound to a host is brokered: the guest holds a placeholder, the host puts the value in requests to that host only', async () => {
    const d = daemon();
    const VALUE = 's3cr3t-value-for-example';
    await d.client.setSecret('TOKEN', VALUE, ['example.test']);
    expect((await d.client.listSecrets()).find((s) => s.name === 'TOKEN')?.hosts).toEqual(['example.test']);
    await d.client.createInstance({ command: ['sleep', '600'], handle: 'brokered', secrets: ['TOKEN'] });
    const sha = (s: string): string => createHash('sha256').update(s).digest('hex');
    const script = `
import os, urllib.request
t = os.environ['TOKEN']
print('placeholder', t.startswith('aegis-secret-'))
for url in ['https://example.test:8443/?key=' + t, 'http://example.test:8081/?key=' + t, 'http://second.test:8081/?key=' + t]:
    r = urllib.request.urlopen(urllib.request.Request(url, headers={'Authorization': 'Bearer ' + t}), timeout=10)
    print(url.split('?')[0], r.read().decode().strip(), r.headers['x-seen-authorization-sha256'], r.headers['x-seen-url-sha256'])
`;
    const r = await d.cli(['exec', 'brokered', '--', 'python3', '-c', script]);
    expect(r.stderr).toBe('');
    const env = await d.cli(['exec', 'brokered', '--', 'sh', '-c', 'echo "$TOKEN"']);
    const placeholder = env.stdout.trim();
    expect(placeholder).toMatch(/^aegis-secret-[0-9a-f]{48}$/);
    const lines = r.stdout.trim().split('\n');
    expect(lines[0]).toBe('placeholder True');
    // Over HTTPS (terminated by the broker with the instance's CA, which the guest trusts) and HTTP: the value.
    expect(lines[1]).toBe(`https://example.test:8443/ outside-ok ${sha(`Bearer ${VALUE}`)} ${sha(`/?key=${VALUE}`)}`);
    expect(lines[2]).toBe(`http://example.test:8081/ outside-ok ${sha(`Bearer ${VALUE}`)} ${sha(`/?key=${VALUE}`)}`);
    // Anywhere else, the placeholder goes out as it is.
    expect(lines[3]).toBe(`http://second.test:8081/ second-ok ${sha(`Bearer ${placeholder}`)} ${sha(`/?key=${placeholder}`)}`);
    // The value is nowhere in the guest: environments, command lines, files.
    const search = await d.cli([
      'exec',
      'brokered',
      '--',
      'sh',
      '-c',
      // The pattern's last letter in brackets: this command's own argv does not match it.
      `cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | grep -c "${VALUE.slice(0, 11)}[${VALUE[11]}]"; ` +
        `grep -rls "${VALUE.slice(0, 11)}[${VALUE[11]}]" /etc /root /tmp /run 2>/dev/null | wc -l`,
    ]);
    expect(search.stdout.trim().split('\n')).toEqual(['0', '0']);
    // Nor in what the daemon shows or logs.
    expect(JSON.stringify(await d.client.getInstance('brokered'))).not.toContain(VALUE);
    expect(JSON.stringify(await d.client.instanceEgress('brokered', true))).not.toContain(VALUE);
    expect(d.log()).not.toContain(VALUE);
    // Without the egress policy there is nothing to broker with: refused, not handed over.
    await expect(d.client.createInstance({ command: ['true'], secrets: ['TOKEN'], network: 'unfiltered' })).rejects.toMatchObject({
      code: 'FAILED_PRECONDITION',
    });
  });

  it('policy and brokered secrets survive an aegisd crash: the restarted daemon adopts the instance with both', async () => {
    const d = daemon();
    const VALUE = 'crash-secret-value';
    await d.client.setSecret('CRASH_TOKEN', VALUE, ['example.test']);
    await d.client.createInstance({
      command: ['sleep', '600'],
      handle: 'crash-egress',
      secrets: ['CRASH_TOKEN'],
      egress: { allow: ['example.test'], deny: [] },
    });
    const script = `
import os, urllib.request
for url in ['https://example.test:8443/', 'http://second.test:8081/']:
    try:
        r = urllib.request.urlopen(urllib.request.Request(url, headers={'Authorization': 'Bearer ' + os.environ['CRASH_TOKEN']}), timeout=10)
        print(url, r.read().decode().strip(), r.headers['x-seen-authorization-sha256'])
    except Exception as e:
        print(url, 'ERROR', type(e).__name__)
`;
    const expected = [
      `https://example.test:8443/ outside-ok ${createHash('sha256').update(`Bearer ${VALUE}`).digest('hex')}`,
      'http://second.test:8081/ ERROR URLError',
    ];
    const before = await d.cli(['exec', 'crash-egress', '--', 'python3', '-c', script]);
    expect(before.stdout.trim().split('\n')).toEqual(expected);
    // SIGKILL the daemon (the world starts it again in the same namespaces).
    const pid = (await d.client.status()).pid;
    process.kill(pid, 'SIGKILL');
    for (let i = 0; ; i++) {
      const now = await d.client.status().catch(() => undefined);
      if (now && now.pid !== pid) break;
      if (i > 300) throw new Error('aegisd did not come back');
      await new Promise((r) => setTimeout(r, 100));
    }
    expect((await d.client.getInstance('crash-egress')).state).toBe('running');
    expect((await d.client.instanceEgress('crash-egress')).allow).toEqual(['example.test']);
    const after = await d.cli(['exec', 'crash-egress', '--', 'python3', '-c', script]);
    expect(after.stdout.trim().split('\n')).toEqual(expected);
  });

  it("a brokered secret in an OCI image: the image's own CA bundle gains the broker's CA, and its python reaches the host over HTTPS", async () => {
    const d = daemon();
    const VALUE = 'image-secret-value';
    await d.client.setSecret('IMG_TOKEN', VALUE, ['example.test']);
    const { layoutDir, ref } = await buildGlibcImage();
    const tar = path.join(d.home, 'python.tar');
    await exportDockerArchive(layoutDir, ref, tar, 'aegis-test/python-ca:1');
    expect((await d.cli(['image', 'import', tar])).code).toBe(0);
    await d.client.createInstance({
      command: ['sleep', '600'],
      handle: 'brokered-image',
      image: 'aegis-test/python-ca:1',
      secrets: ['IMG_TOKEN'],
    });
    const script = `
import os, urllib.request
r = urllib.request.urlopen(urllib.request.Request('https://example.test:8443/', headers={'Authorization': 'Bearer ' + os.environ['IMG_TOKEN']}), timeout=10)
print(r.read().decode().strip(), r.headers['x-seen-authorization-sha256'])
`;
    const r = await d.cli(['exec', 'brokered-image', '--', 'python3', '-c', script]);
    expect(r.stderr).toBe('');
    expect(r.stdout.trim()).toBe(`outside-ok ${createHash('sha256').update(`Bearer ${VALUE}`).digest('hex')}`);
    // The image's own bundle keeps its certificate and gains the broker's; the full bundle has both.
    const count = `import sys\nfor f in sys.argv[1:]: print(f, open(f).read().count('BEGIN CERTIFICATE'))`;
    const bundle = await d.cli(['exec', 'brokered-image', '--', 'python3', '-c', count, GLIBC_IMAGE.caBundle, '/etc/aegis/ca-bundle.pem']);
    expect(bundle.stdout.trim().split('\n')).toEqual([`${GLIBC_IMAGE.caBundle} 2`, '/etc/aegis/ca-bundle.pem 2']);
  });

  it('refuses an unknown network mode with a coded error', async () => {
    const r = await daemon().cli(['run', '--network', 'host', '--', 'true']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain('--network');
    await expect(daemon().client.createInstance({ command: ['true'], network: 'host' as 'none' })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
  });
});
