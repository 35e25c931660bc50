/**
 * Guest networking on real VMs. The daemon (and so passt and QEMU) runs in a network namespace
 * of its own with a private "internet" (tests/support/netns-world.mjs): nothing a guest sends
 * leaves the machine, and the host-loopback service it must not reach is a real server on
 * 127.0.0.1 of that namespace.
 */
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, useDaemon } from './fixture.js';

const world = ['unshare', '--net', '--mount', process.execPath, path.join(ROOT, 'tests/support/netns-world.mjs')];
const daemon = useDaemon({}, world);

/** Fetches each URL from inside the guest; prints `URL -> body` or `URL -> ERROR kind`. */
const fetchScript = (urls: string[]): string[] => [
  'python3',
  '-c',
  `
import sys, urllib.request
for url in sys.argv[1:]:
    try:
        body = urllib.request.urlopen(url, timeout=4).read().decode().strip()
        print(url, '->', body)
    except Exception as e:
        print(url, '->', 'ERROR', type(e).__name__)
`,
  ...urls,
];

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

  it('the default network is user-mode, shown in info', async () => {
    const i = await daemon().client.createInstance({ command: ['sleep', '60'] });
    expect(i.network).toBe('user');
    const r = await daemon().cli(['exec', i.handle, '--', 'sh', '-c', 'ls /sys/class/net; cat /etc/resolv.conf']);
    expect(r.stdout).toBe('eth0\nlo\nnameserver 10.0.2.3\n');
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
