#!/usr/bin/env node
// npm run bench: Aegis against the reference measured in the same run, median of N runs each.
//   cold `aegis run -- true` (CLI -> aegisd -> new VM -> harness -> workload -> VM gone), and
//   warm: the same with the VM restored from a snapshot template instead of booted,
//   vs. the raw boot of the same kernel + rootfs by QEMU alone (init=/bin/true; QEMU exits
//   when the kernel panics on init's exit), started through the same backend code.
// Target (issue 2): ratio <= 1.2.
//   `aegis exec <h> -- true` round trip (CLI process, and the API client alone), median of 50,
//   vs. the harness's own time to spawn `true` plus one agent-channel round trip, measured on a
//   VM driven directly through the backend (no daemon). Target (issue 3): ratio <= 2.
//   --expose throughput (a 32 MiB download) and request latency (a small GET), median of N,
//   vs. the same transfers from the same guest server on the same VM through the backend's
//   raw mechanism (passt's own port forward, added for the bench). Target (issue 4): >= 80%.
//   `aegis image pull` (download + verify + prepare the filesystem) of a >= 100 MiB image vs.
//   `skopeo copy` + `umoci unpack --rootless` of it from the same local registry, median of N.
//   Target (issue 5): ratio <= 1.0. And `instance start --image` when the image must be pulled
//   and prepared (1st) vs. when it is prepared (2nd).
//   The CLI's own start: `aegis --version` vs. `node -e 0`, and `aegis exec <h> -- true` vs. the
//   API client doing the same exec, median of N. Target (issue 11): the CLI adds <= 25 ms.
//   `aegis cp` of a 256 MiB file in and out vs. the data channel's raw rate (TCP through --expose)
//   and vs. `cat` over `aegis exec`. Target (issue 12): cp >= 80% of the raw rate.
//   The SDK (create + run `true` + kill) vs. the raw typed client doing the same (target <= 1.1x),
//   and an MCP tool call's round trip through `aegis mcp` (issue 13).
//   Volumes: 1,000 small files and one 256 MiB file written then read on a host directory
//   (-v HOST:GUEST, 9p) and on a named volume (-v NAME:GUEST, an ext4 disk) vs. the same work on
//   the guest's own scratch disk, same VM, interleaved, timed inside the guest. Target (issue 12):
//   named volume >= 90% of the scratch disk.
//   The warm pool (issue 14): cold, template-warm and pooled `aegis run -- true` (CLI and API
//   client), median of >= 10 each, and sequential runs per minute. Target: cold / pooled >= 10x.
//   Idle pause (issue 14): `aegis exec <h> -- true` and the first response byte of a new TCP
//   connection through --expose on an idle-paused instance vs. the same on a running one,
//   interleaved, median of >= 10; and density: N idle-paused instances (BENCH_IDLE_N, default
//   8), the PSS of each one's VMM and passt, and how many would fit in MemAvailable (extrapolated).
//   Checkpoints (issue 22): the pause of `snapshot create` and the snapshot's size with 128 and
//   512 MiB of guest memory touched; a start from a snapshot vs. a cold boot; `fork -n 4`.
import { execFile, spawn } from 'node:child_process';
import {
  mkdtempSync,
  rmSync,
  realpathSync,
  existsSync,
  mkdirSync,
  writeFileSync,
  openSync,
  closeSync,
  readFileSync,
  readdirSync,
  createReadStream,
  statSync,
} from 'node:fs';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AegisClient } from '@aegis/client';
import { QemuBackend } from '@aegis/vmm-qemu';
import { RpcPeer, parseEvent } from '@aegis/protocol';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const RUNS = Number(process.env.BENCH_RUNS ?? 5);
const mainHome = process.env.AEGIS_HOME ?? path.join(os.homedir(), '.aegis');
const kernel = path.join(mainHome, 'cache/kernel/vmlinux');
const rootfs = path.join(mainHome, 'cache/rootfs/base.erofs');
for (const f of [kernel, rootfs]) if (!existsSync(f)) throw new Error(`${f} missing: run make all`);

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const fmt = (ms) => `${(ms / 1000).toFixed(3)} s`;

/** A VM of the bench's own, through the backend alone (no daemon); `formatted` makes its scratch disk ext4. */
async function benchVm(workDir, id, kernelArgs, formatted) {
  const stateDir = path.join(workDir, id);
  mkdirSync(stateDir, { recursive: true });
  const scratch = path.join(stateDir, 'scratch.img');
  writeFileSync(scratch, '');
  if (formatted) {
    await new Promise((res, rej) => execFile('truncate', ['-s', '256M', scratch], (e) => (e ? rej(e) : res())));
    await new Promise((res, rej) => execFile('mkfs.ext4', ['-q', '-F', '-O', '^has_journal', scratch], (e) => (e ? rej(e) : res())));
  }
  return new QemuBackend().create({
    id,
    stateDir,
    kernelPath: realpathSync(kernel),
    rootfsPath: realpathSync(rootfs),
    scratchDiskPath: scratch,
    memoryMiB: 512,
    vcpuCount: 1,
    kernelArgs,
  });
}

async function rawBoot(workDir, i) {
  const vm = await benchVm(workDir, `bench-raw-${i}`, ['init=/bin/true'], false);
  const t0 = performance.now();
  await vm.start();
  const exit = await vm.exited;
  const ms = performance.now() - t0;
  if (exit.reason !== 'guest-poweroff' && exit.reason !== 'guest-panic') throw new Error(`raw boot ended oddly: ${exit.detail}`);
  return ms;
}

/** Boots a VM through the backend alone and measures the harness from the host's side. */
async function directHarness(workDir, n) {
  const vm = await benchVm(workDir, 'bench-direct', [], true);
  await vm.start();
  try {
    const stream = await vm.connectAgent();
    const exits = new Map();
    const peer = new RpcPeer({
      send: (l) => stream.write(l),
      onNotification: (method, params) => {
        if (method === 'execExit') {
          const ev = parseEvent.execExit(params);
          exits.get(ev.execId)?.(ev);
        }
      },
    });
    stream.on('data', (c) => peer.receive(c));
    for (let i = 0; ; i++) {
      try {
        await peer.request('health', {}, { timeoutMs: 300 });
        break;
      } catch (err) {
        if (i > 200) throw err;
      }
    }
    const rtt = [];
    const spawn = [];
    for (let i = 0; i < n + 3; i++) {
      const t0 = performance.now();
      await peer.request('health', {}, { timeoutMs: 5000 });
      if (i >= 3) rtt.push(performance.now() - t0);
      const execId = `b${i}`;
      const done = new Promise((r) => exits.set(execId, r));
      await peer.request('exec', { execId, command: ['true'], env: {} }, { timeoutMs: 10_000 });
      const ev = await done;
      if (i >= 3) spawn.push(ev.durationMs);
    }
    stream.destroy();
    return { rtt, spawn };
  } finally {
    await vm.stop({ timeoutMs: 1000 });
  }
}

function aegisExec(env, ref) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile(path.join(ROOT, 'bin/aegis'), ['exec', ref, '--', 'true'], { env }, (err) => {
      if (err) reject(err);
      else resolve(performance.now() - t0);
    });
  });
}

async function apiExec(client, ref) {
  const t0 = performance.now();
  let guest;
  for await (const ev of client.exec(ref, { command: ['true'] })) if (ev.type === 'exit') guest = ev.guestDurationMs;
  return { ms: performance.now() - t0, guest };
}

/** An exec's stdout as text (throws on a non-zero exit, with its stderr). */
async function apiExecOutput(client, ref, command) {
  let out = '';
  let err = '';
  let code;
  for await (const ev of client.exec(ref, { command })) {
    if (ev.type === 'output' && ev.stream === 'stdout') out += Buffer.from(ev.data, 'base64').toString();
    if (ev.type === 'output' && ev.stream === 'stderr') err += Buffer.from(ev.data, 'base64').toString();
    if (ev.type === 'exit') code = ev.exitCode;
  }
  if (code !== 0) throw new Error(`exec ${command[0]} exited ${code}: ${err.slice(-300)}`);
  return out;
}

function aegisRun(env) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile(path.join(ROOT, 'bin/aegis'), ['run', '--', 'true'], { env }, (err) => {
      if (err) reject(err);
      else resolve(performance.now() - t0);
    });
  });
}

/** Wall time of one process, start to exit; rejects if it fails. */
function wallMs(cmd, args, env) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile(cmd, args, { env: env ?? process.env }, (err) => (err ? reject(err) : resolve(performance.now() - t0)));
  });
}

/**
 * A bare Node process doing the exec the CLI does: the same request (client.ts's), read to the
 * end, with nothing loaded but node:http. What `aegis exec` costs without the CLI.
 */
const BARE_EXEC = `const http = require('node:http');
const body = JSON.stringify({ command: ['true'] });
const headers = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
const req = http.request({ socketPath: process.argv[1], method: 'POST', path: '/v1/instances/' + process.argv[2] + '/exec', headers }, (res) => {
  if (res.statusCode !== 200) process.exit(1);
  res.resume();
});
req.end(body);`;

/**
 * What the CLI adds to a bare Node start: `aegis --version` (load and parse, no daemon) vs.
 * `node -e 0`, and `aegis exec <h> -- true` vs. a bare Node process making the same request
 * (BARE_EXEC), interleaved so the machine's load hits all alike. bin/aegis runs the bundle
 * (packages/cli/build.mjs); the unbundled tsc output, and the API client's exec inside this
 * process (no process start at all), are measured beside them.
 */
async function benchCli() {
  const cli = path.join(ROOT, 'packages/cli');
  const bundle = path.join(cli, 'dist/aegis.mjs');
  const tscBuild = path.join(cli, 'tsconfig.tsbuildinfo');
  if (!existsSync(bundle) || statSync(tscBuild).mtimeMs > statSync(bundle).mtimeMs) {
    throw new Error(`${bundle} is missing or older than the last tsc build: run npm run build`);
  }
  const N = Number(process.env.BENCH_CLI_RUNS ?? 30);
  const aegis = path.join(ROOT, 'bin/aegis');
  const starts = { node: [], version: [], unbundled: [] };
  for (let i = 0; i < N + 3; i++) {
    const node = await wallMs('node', ['-e', '0']);
    const version = await wallMs(aegis, ['--version']);
    const unbundled = await wallMs('node', [path.join(cli, 'dist/main.js'), '--version']);
    if (i < 3) continue;
    starts.node.push(node);
    starts.version.push(version);
    starts.unbundled.push(unbundled);
  }
  const d = await startDaemon(false);
  const exec = { cli: [], bare: [], api: [] };
  const bare = () => wallMs('node', ['-e', BARE_EXEC, path.join(d.home, 'aegisd.sock'), 'bench-cli']);
  try {
    await d.client.createInstance({ handle: 'bench-cli', command: ['sleep', '3600'] });
    for (let i = 0; i < 3; i++) await Promise.all([aegisExec(d.env, 'bench-cli'), bare()]);
    for (let i = 0; i < N; i++) {
      exec.bare.push(await bare());
      exec.cli.push(await aegisExec(d.env, 'bench-cli'));
      exec.api.push((await apiExec(d.client, 'bench-cli')).ms);
    }
    await d.client.deleteInstance('bench-cli', { force: true });
  } finally {
    await d.stop();
  }
  const m = (xs) => `${median(xs).toFixed(1)} ms`;
  console.log(`\nthe CLI's own start, ${N} runs each:`);
  console.log(`${'`node -e 0` (reference)'.padEnd(56)} median ${m(starts.node)}`);
  console.log(`${'`aegis --version` (bin/aegis, the bundle)'.padEnd(56)} median ${m(starts.version)}`);
  console.log(`${'`node packages/cli/dist/main.js --version` (unbundled)'.padEnd(56)} median ${m(starts.unbundled)}`);
  console.log(`${'the same exec from a bare `node -e` (node:http only)'.padEnd(56)} median ${m(exec.bare)}`);
  console.log(`${'`aegis exec <h> -- true` (bin/aegis)'.padEnd(56)} median ${m(exec.cli)}`);
  console.log(`${'exec through the API client in this process (no start)'.padEnd(56)} median ${m(exec.api)}`);
  const versionMs = median(starts.version) - median(starts.node);
  const execMs = median(exec.cli) - median(exec.bare);
  const met = (x) => (x <= 25 ? 'met' : 'NOT met');
  console.log(
    `\nCLI overhead, aegis --version - node -e 0: ${versionMs.toFixed(1)} ms (target <= 25 ms: ${met(versionMs)}); ` +
      `aegis exec - bare node exec: ${execMs.toFixed(1)} ms (${met(execMs)}); ` +
      `unbundled --version - node -e 0: ${(median(starts.unbundled) - median(starts.node)).toFixed(1)} ms`,
  );
  return {
    nodeMs: starts.node,
    versionMs: starts.version,
    unbundledVersionMs: starts.unbundled,
    execCliMs: exec.cli,
    execBareNodeMs: exec.bare,
    execApiMs: exec.api,
  };
}

/** A daemon of the bench's own; `warm` lets it restore instances from snapshot templates. */
async function startDaemon(warm, extraEnv = {}) {
  const home = mkdtempSync('/tmp/aegis-bench-');
  const env = {
    ...process.env,
    // A section that measures the warm pool turns it on; elsewhere "warm" means a template restore.
    AEGIS_POOL_SIZE: '0',
    ...extraEnv,
    AEGIS_HOME: home,
    AEGIS_KERNEL: realpathSync(kernel),
    AEGIS_ROOTFS: realpathSync(rootfs),
    AEGIS_WARM_BOOT: warm ? '1' : '0',
  };
  const logFile = path.join(home, 'aegisd.log');
  const log = openSync(logFile, 'a');
  const proc = spawn(process.execPath, [path.join(ROOT, 'packages/daemon/dist/main.js')], { env, stdio: ['ignore', log, log] });
  closeSync(log);
  const client = new AegisClient(path.join(home, 'aegisd.sock'));
  for (let i = 0; ; i++) {
    try {
      await client.status();
      break;
    } catch (err) {
      if (i > 200) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    home,
    env,
    client,
    log: () => readFileSync(logFile, 'utf8'),
    pid: proc.pid,
    async stop() {
      proc.kill('SIGTERM');
      await new Promise((r) => proc.once('exit', r));
      rmSync(home, { recursive: true, force: true });
    },
  };
}

/** GETs a URL; resolves with the time to the last byte and the byte count. */
function httpGet(url) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    http
      .get(url, (res) => {
        let bytes = 0;
        res.on('data', (c) => (bytes += c.length));
        res.on('end', () => resolve({ ms: performance.now() - t0, bytes }));
        res.on('error', reject);
      })
      .on('error', reject);
  });
}

async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

/** --expose against passt's own forward, one VM serving both, alternating. */
async function benchExpose() {
  const rawPort = await freePort();
  const d = await startDaemon(false, { AEGIS_BENCH_PASST_TCP: `${rawPort}:8000` });
  try {
    const blobMiB = 32;
    const inst = await d.client.createInstance({
      handle: 'bench-net',
      command: [
        'sh',
        '-c',
        `head -c ${blobMiB}M /dev/urandom > /tmp/blob && echo hi > /tmp/small && exec python3 -m http.server 8000 --directory /tmp`,
      ],
      exposes: [{ guestPort: 8000 }],
    });
    const exposePort = inst.ports[0].hostPort;
    const paths = { aegis: `http://127.0.0.1:${exposePort}`, raw: `http://127.0.0.1:${rawPort}` };
    for (let i = 0; ; i++) {
      try {
        const r = await httpGet(`${paths.aegis}/blob`);
        if (r.bytes === blobMiB << 20) break;
      } catch {
        // server not up yet
      }
      if (i > 300) throw new Error('the guest http server never served the blob');
      await new Promise((r) => setTimeout(r, 200));
    }
    const mbps = { aegis: [], raw: [] };
    const lat = { aegis: [], raw: [] };
    for (let i = 0; i < RUNS; i++) {
      for (const k of ['raw', 'aegis']) {
        const r = await httpGet(`${paths[k]}/blob`);
        if (r.bytes !== blobMiB << 20) throw new Error(`${k}: short transfer (${r.bytes} bytes)`);
        mbps[k].push(r.bytes / 1e6 / (r.ms / 1000));
      }
    }
    const LAT_RUNS = Math.max(20, RUNS * 4);
    for (let i = 0; i < LAT_RUNS; i++) for (const k of ['raw', 'aegis']) lat[k].push((await httpGet(`${paths[k]}/small`)).ms);
    await d.client.deleteInstance('bench-net', { force: true });
    const tput = median(mbps.aegis) / median(mbps.raw);
    const latRatio = median(lat.raw) / median(lat.aegis);
    console.log(`
--expose vs passt's own port forward, same VM and guest server (python3 http.server):`);
    console.log(`${`${blobMiB} MiB download through passt -t (raw)`.padEnd(56)} median ${median(mbps.raw).toFixed(1)} MB/s`);
    console.log(`${`${blobMiB} MiB download through --expose`.padEnd(56)} median ${median(mbps.aegis).toFixed(1)} MB/s`);
    console.log(`${'small GET through passt -t (raw)'.padEnd(56)} median ${median(lat.raw).toFixed(1)} ms`);
    console.log(`${'small GET through --expose'.padEnd(56)} median ${median(lat.aegis).toFixed(1)} ms`);
    console.log(
      `
throughput --expose / raw: ${(tput * 100).toFixed(0)}% (target >= 80%: ${tput >= 0.8 ? 'met' : 'NOT met'}); ` +
        `request rate --expose / raw: ${(latRatio * 100).toFixed(0)}%`,
    );
    return { throughputMBps: mbps, latencyMs: lat, throughputRatio: tput, latencyRatio: latRatio };
  } finally {
    await d.stop();
  }
}

const EGRESS_CLIENT = `
import socket, sys, time
host, port, blob_bytes, small_n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def get(path):
    s = socket.create_connection((host, port))
    s.sendall(b'GET ' + path + b' HTTP/1.0\\r\\n\\r\\n')
    buf = bytearray(1 << 20); n = 0
    while True:
        k = s.recv_into(buf)
        if k == 0: break
        n += k
    s.close()
    return n
t0 = time.time(); n = get(b'/blob'); t1 = time.time()
assert n > blob_bytes, n
for _ in range(small_n): get(b'/small')
t2 = time.time()
s = socket.create_connection((host, port), timeout=120)
s.sendall(b'POST /upload HTTP/1.0\\r\\nContent-Length: %d\\r\\n\\r\\n' % blob_bytes)
chunk = b'x' * (1 << 20)
for _ in range(blob_bytes >> 20): s.sendall(chunk)
while s.recv(65536): pass
t3 = time.time()
print(n / (t1 - t0) / 1e6, small_n / (t2 - t1), blob_bytes / (t3 - t2) / 1e6)
`;

/**
 * The egress policy's path (every connection decided and carried by aegisd over the data
 * channel) against today's unfiltered path (passt), in the same daemon and run: one large
 * download and sequential connections per second, measured inside each guest, alternating.
 * The server is the host's own non-loopback address, which the policy refuses unless named.
 */
async function benchEgress() {
  const hostIp = Object.values(os.networkInterfaces())
    .flat()
    .find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
  if (!hostIp) {
    console.log('\negress: skipped (this host has no non-loopback IPv4 address to serve from)');
    return undefined;
  }
  const blobMiB = 32;
  const blob = Buffer.alloc(blobMiB << 20, 7);
  const server = http.createServer((req, res) => {
    if (req.url !== '/upload') return void res.end(req.url === '/blob' ? blob : 'ok\n');
    req.resume();
    req.on('end', () => res.end('ok\n'));
  });
  await new Promise((r) => server.listen(0, hostIp, r));
  const port = server.address().port;
  const d = await startDaemon(false);
  try {
    const paths = {
      policy: await d.client.createInstance({
        handle: 'bench-egress',
        command: ['sleep', 'infinity'],
        egress: { allow: [`${hostIp}:${port}`] },
      }),
      unfiltered: await d.client.createInstance({ handle: 'bench-passt', command: ['sleep', 'infinity'], network: 'unfiltered' }),
    };
    const SMALL = 50;
    const measure = async (inst) => {
      const r = await apiExecOutput(d.client, inst.id, [
        'python3',
        '-c',
        EGRESS_CLIENT,
        hostIp,
        String(port),
        String(blobMiB << 20),
        String(SMALL),
      ]);
      const [mbps, cps, up] = r.trim().split(' ').map(Number);
      if (!Number.isFinite(mbps) || !Number.isFinite(cps) || !Number.isFinite(up)) throw new Error(`${inst.handle}: ${r}`);
      return { mbps, cps, up };
    };
    for (const inst of Object.values(paths)) await measure(inst); // warm-up: python's start, the page cache
    const mbps = { policy: [], unfiltered: [] };
    const cps = { policy: [], unfiltered: [] };
    const up = { policy: [], unfiltered: [] };
    for (let i = 0; i < RUNS; i++) {
      for (const k of ['unfiltered', 'policy']) {
        const r = await measure(paths[k]);
        mbps[k].push(r.mbps);
        cps[k].push(r.cps);
        up[k].push(r.up);
      }
    }
    const tput = median(mbps.policy) / median(mbps.unfiltered);
    const rate = median(cps.policy) / median(cps.unfiltered);
    const upRatio = median(up.policy) / median(up.unfiltered);
    console.log(`
egress policy (aegisd carries each connection) vs --network unfiltered (passt), same daemon, client in the guest:`);
    console.log(`${`${blobMiB} MiB download, unfiltered (passt)`.padEnd(56)} median ${median(mbps.unfiltered).toFixed(1)} MB/s`);
    console.log(`${`${blobMiB} MiB download, egress policy`.padEnd(56)} median ${median(mbps.policy).toFixed(1)} MB/s`);
    console.log(`${`${blobMiB} MiB upload, unfiltered (passt)`.padEnd(56)} median ${median(up.unfiltered).toFixed(1)} MB/s`);
    console.log(`${`${blobMiB} MiB upload, egress policy`.padEnd(56)} median ${median(up.policy).toFixed(1)} MB/s`);
    console.log(`${'connections/s (GET, sequential), unfiltered (passt)'.padEnd(56)} median ${median(cps.unfiltered).toFixed(1)}/s`);
    console.log(`${'connections/s (GET, sequential), egress policy'.padEnd(56)} median ${median(cps.policy).toFixed(1)}/s`);
    console.log(
      `
download policy / unfiltered: ${(tput * 100).toFixed(0)}% (target >= 80%: ${tput >= 0.8 ? 'met' : 'NOT met'}); ` +
        `upload: ${(upRatio * 100).toFixed(0)}% (${upRatio >= 0.8 ? 'met' : 'NOT met'}); ` +
        `connections/s policy / unfiltered: ${(rate * 100).toFixed(0)}% (target >= 80%: ${rate >= 0.8 ? 'met' : 'NOT met'})`,
    );
    return {
      throughputMBps: mbps,
      uploadMBps: up,
      connectionsPerS: cps,
      throughputRatio: tput,
      uploadRatio: upRatio,
      connectionRatio: rate,
    };
  } finally {
    // VMs outlive their daemon: delete the instances first.
    for (const h of ['bench-egress', 'bench-passt']) await d.client.deleteInstance(h, { force: true }).catch(() => undefined);
    await d.stop();
    server.close();
  }
}

/** Test fixtures (TypeScript) bundled for plain Node: the image builder and the registry runner. */
async function loadImageSupport() {
  const { build } = await import('esbuild');
  const outfile = path.join(ROOT, 'bench/.build/support.mjs');
  await build({
    stdin: {
      contents: "export * from './tests/support/oci-images.ts'; export * from './tests/support/registry.ts';",
      resolveDir: ROOT,
      loader: 'ts',
    },
    bundle: true,
    platform: 'node',
    format: 'esm',
    packages: 'external',
    outfile,
    logLevel: 'warning',
  });
  return import(outfile);
}

const run = (cmd, args, env) =>
  new Promise((resolve, reject) => {
    const t0 = performance.now();
    execFile(cmd, args, { env: env ?? process.env, maxBuffer: 64 << 20 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} ${args.join(' ')}: ${stderr || err.message}`));
      else resolve({ ms: performance.now() - t0, stdout });
    });
  });

async function benchImages() {
  const support = await loadImageSupport();
  const { layoutDir } = await support.buildGlibcImage();
  const registry = await support.startRegistry();
  const ref = `${registry.host}/bench/python:1`;
  await support.pushOciLayout(layoutDir, ref, undefined, support.GLIBC_IMAGE.refs.root);
  const d = await startDaemon(false);
  const scratch = mkdtempSync('/tmp/aegis-bench-umoci-');
  try {
    const ours = [];
    const reference = [];
    let fsBytes = 0;
    for (let i = 0; i < RUNS; i++) {
      rmSync(path.join(scratch, 'oci'), { recursive: true, force: true });
      rmSync(path.join(scratch, 'bundle'), { recursive: true, force: true });
      const t0 = performance.now();
      await run('skopeo', [
        'copy',
        '--insecure-policy',
        '--quiet',
        '--src-tls-verify=false',
        `docker://${ref}`,
        `oci:${scratch}/oci:python`,
      ]);
      await run('umoci', ['unpack', '--rootless', '--image', `${scratch}/oci:python`, `${scratch}/bundle`]);
      reference.push(performance.now() - t0);
      // `image rm` deletes its blobs and filesystem: each pull starts from nothing.
      await d.client.removeImage(ref).catch(() => undefined);
      ours.push((await run(path.join(ROOT, 'bin/aegis'), ['image', 'pull', ref], d.env)).ms);
      fsBytes = (await d.client.getImage(ref)).fsBytes;
    }
    const ratio = median(ours) / median(reference);
    console.log(`
image pull + prepare, ${ref} (${(fsBytes / (1 << 20)).toFixed(0)} MiB filesystem), same local registry:`);
    console.log(`${'skopeo copy + umoci unpack --rootless (reference)'.padEnd(56)} median ${fmt(median(reference))}`);
    console.log(`${'aegis image pull (download, verify, ext4 image)'.padEnd(56)} median ${fmt(median(ours))}`);
    console.log(`ratio aegis / reference: ${ratio.toFixed(2)}x (target <= 1.00x: ${ratio <= 1 ? 'met' : 'NOT met'})`);

    // 1st instance of an image this host lacks (pull + prepare + boot) vs the 2nd (boot only).
    const first = [];
    const second = [];
    for (let i = 0; i < RUNS; i++) {
      await d.client.removeImage(ref).catch(() => undefined);
      const start = (h) =>
        run(path.join(ROOT, 'bin/aegis'), ['instance', 'start', '--name', h, '--image', ref, '--', 'sleep', '600'], d.env);
      first.push((await start('bench-img-1')).ms);
      second.push((await start('bench-img-2')).ms);
      await d.client.deleteInstance('bench-img-1', { force: true });
      await d.client.deleteInstance('bench-img-2', { force: true });
    }
    console.log(`${'1st `instance start --image` (pull + prepare + cold boot)'.padEnd(56)} median ${fmt(median(first))}`);
    console.log(`${'2nd `instance start --image` (prepared; cold boot)'.padEnd(56)} median ${fmt(median(second))}`);
    console.log(`ratio 2nd / 1st: ${(median(second) / median(first)).toFixed(2)}x`);
    return { pullMs: ours, referenceMs: reference, ratio, fsBytes, firstStartMs: first, secondStartMs: second };
  } finally {
    await d.stop();
    await registry.stop();
    rmSync(scratch, { recursive: true, force: true });
  }
}

/**
 * What deciding KVM vs TCG costs: a probe with no verdict yet (the test boot of the guest
 * kernel under KVM, as a daemon's first start on this host pays it in the background) and a
 * probe that finds the cached verdict (every later start), against a probe told not to test
 * (AEGIS_ACCEL=tcg) as the reference.
 */
async function benchAccel() {
  const k = realpathSync(kernel);
  const timed = async (cacheDir) => {
    const t0 = performance.now();
    let p = await new QemuBackend({ kernelPath: k, cacheDir }).probe();
    if (p.settled) p = await p.settled;
    return { ms: performance.now() - t0, reason: p.accelerationReason };
  };
  const first = [];
  const later = [];
  const none = [];
  let reason = '';
  for (let i = 0; i < RUNS; i++) {
    const dir = mkdtempSync('/tmp/aegis-bench-accel-');
    const f = await timed(dir);
    first.push(f.ms);
    reason = f.reason;
    later.push((await timed(dir)).ms);
    process.env.AEGIS_ACCEL = 'tcg';
    none.push((await timed(dir)).ms);
    delete process.env.AEGIS_ACCEL;
    rmSync(dir, { recursive: true, force: true });
  }
  console.log(`\naccelerator probe, ${RUNS} runs each (verdict here: ${reason}):`);
  const ms = (x) => `${x.toFixed(1)} ms`;
  console.log(`${'probe without a test (AEGIS_ACCEL=tcg): reference'.padEnd(56)} median ${ms(median(none))}`);
  console.log(`${'first start: KVM test boot, verdict cached'.padEnd(56)} median ${ms(median(first))}`);
  console.log(`${'later starts: cached verdict'.padEnd(56)} median ${ms(median(later))}`);
  console.log(
    `ratio first / reference: ${(median(first) / median(none)).toFixed(2)}x; later / reference: ${(median(later) / median(none)).toFixed(2)}x`,
  );
  return { firstMs: first, laterMs: later, referenceMs: none, verdict: reason };
}

/** Wall time of a shell pipeline (for `aegis exec … > file` and `… < file`). */
function shellMs(script, env) {
  return wallMs('bash', ['-c', script], env);
}

/**
 * `aegis cp` of a 256 MiB file in and out, against the data channel's raw rate in the same run
 * (TCP through --expose to a guest server that sends or sinks the same file with sendfile/recv:
 * the bytes cross the same channel and data plane, with no file service or tar in the way),
 * and against `cat` of the same file through `aegis exec` (bytes as base64 JSON).
 * Target: cp >= 80% of the raw rate, each way.
 */
async function benchCp() {
  const d = await startDaemon(false);
  const work = mkdtempSync('/tmp/aegis-bench-cp-');
  const MIB = Number(process.env.BENCH_CP_MIB ?? 256);
  const bytes = MIB << 20;
  const CAT_RUNS = Math.min(RUNS, Number(process.env.BENCH_CP_CAT_RUNS ?? 3));
  // Port 9001 sends /root/blob to whoever connects; 9002 writes what it receives to /root/sunk.
  const server = `
import os, socket, threading
def send(c):
    with c, open('/root/blob', 'rb') as f: c.sendfile(f)
def sink(c):
    with c, open('/root/sunk', 'wb') as f:
        buf = bytearray(1 << 20)
        while (n := c.recv_into(buf)): f.write(memoryview(buf)[:n])
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', port)); s.listen(8)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,)).start()
threading.Thread(target=serve, args=(9002, sink)).start()
serve(9001, send)`;
  try {
    const inst = await d.client.createInstance({
      handle: 'bench-cp',
      command: ['sh', '-c', `head -c ${MIB}M /dev/urandom > /root/blob && exec python3 -c "$0"`, server],
      exposes: [{ guestPort: 9001 }, { guestPort: 9002 }],
      network: 'none',
      memoryMiB: 1024,
    });
    const [sendPort, sinkPort] = inst.ports.map((p) => p.hostPort);
    const local = path.join(work, 'blob');
    await wallMs('head', ['-c', `${MIB}M`, '/dev/urandom', '-o', local]).catch(async () => {
      await wallMs('bash', ['-c', `head -c ${MIB}M /dev/urandom > ${local}`]);
    });
    const rawOut = () =>
      new Promise((resolve, reject) => {
        const t0 = performance.now();
        let n = 0;
        const c = net.connect(sendPort, '127.0.0.1');
        c.on('data', (b) => (n += b.length));
        c.on('end', () => (n === bytes ? resolve(performance.now() - t0) : reject(new Error(`raw out: ${n} of ${bytes} bytes`))));
        c.on('error', reject);
      });
    const rawIn = () =>
      new Promise((resolve, reject) => {
        const t0 = performance.now();
        const c = net.connect(sinkPort, '127.0.0.1');
        c.on('error', reject);
        // The guest closes once it has written everything: that is the end of the transfer.
        c.on('close', () => resolve(performance.now() - t0));
        c.resume();
        createReadStream(local).pipe(c);
      });
    const A = path.join(ROOT, 'bin/aegis');
    const cpIn = () => wallMs(A, ['cp', local, 'bench-cp:/root/in'], d.env);
    // Each copy out lands where nothing is (the last run's 256 MiB file removed first, untimed),
    // so no run pays for unlinking the one before it.
    const cpOut = () => {
      rmSync(path.join(work, 'out'), { force: true });
      return wallMs(A, ['cp', 'bench-cp:/root/blob', path.join(work, 'out')], d.env);
    };
    const catIn = () => shellMs(`"${A}" exec -i bench-cp -- sh -c 'cat > /root/catin' < "${local}"`, d.env);
    const catOut = () => shellMs(`"${A}" exec bench-cp -- cat /root/blob > "${path.join(work, 'catout')}"`, d.env);
    for (let i = 0; ; i++) {
      try {
        await rawOut();
        break;
      } catch (err) {
        if (i > 300) throw err;
        await new Promise((r) => setTimeout(r, 200));
      }
    }
    const t = { rawOut: [], cpOut: [], rawIn: [], cpIn: [], catOut: [], catIn: [] };
    // Each transfer starts with the guest's and the host's dirty pages written back (untimed):
    // otherwise the 256 MiB the last one wrote (to the host's disk, or to the guest's, which is
    // a file on the host's) are written back during the next one, on the same two cores.
    const timed = async (fn) => {
      await wallMs(A, ['exec', 'bench-cp', '--', 'sync'], d.env);
      await wallMs('sync', []);
      return fn();
    };
    for (let i = 0; i < RUNS; i++) {
      t.rawOut.push(await timed(rawOut));
      t.cpOut.push(await timed(cpOut));
      t.rawIn.push(await timed(rawIn));
      t.cpIn.push(await timed(cpIn));
      if (i < CAT_RUNS) {
        t.catOut.push(await timed(catOut));
        t.catIn.push(await timed(catIn));
      }
    }
    const rate = (ms) => bytes / 1e6 / (median(ms) / 1000);
    console.log(`\naegis cp of a ${MIB} MiB file vs the data channel's raw rate (same VM), median of ${RUNS} (cat: ${CAT_RUNS}):`);
    const rows = [
      ['out: raw data channel (TCP via --expose, sendfile)', t.rawOut],
      ['out: aegis cp bench-cp:/root/blob .', t.cpOut],
      ['out: aegis exec -- cat (base64 JSON)', t.catOut],
      ['in:  raw data channel (TCP via --expose, to a file)', t.rawIn],
      ['in:  aegis cp blob bench-cp:/root/in', t.cpIn],
      ['in:  aegis exec -i -- cat > file (base64 JSON)', t.catIn],
    ];
    // Every run beside the median: one slow run among five is the machine, all five is us.
    const each = (xs) => xs.map((ms) => (ms / 1000).toFixed(2)).join(' ');
    for (const [name, xs] of rows)
      console.log(`${name.padEnd(56)} median ${rate(xs).toFixed(1)} MB/s (${fmt(median(xs))}; runs ${each(xs)} s)`);
    const outRatio = rate(t.cpOut) / rate(t.rawOut);
    const inRatio = rate(t.cpIn) / rate(t.rawIn);
    const verdict = (r) => `${(r * 100).toFixed(0)}% (target >= 80%: ${r >= 0.8 ? 'met' : 'NOT met'})`;
    console.log(
      `\ncp out / raw: ${verdict(outRatio)}; cp in / raw: ${verdict(inRatio)}; cp vs exec cat: out ${(rate(t.cpOut) / rate(t.catOut)).toFixed(1)}x, in ${(rate(t.cpIn) / rate(t.catIn)).toFixed(1)}x`,
    );
    await d.client.deleteInstance('bench-cp', { force: true });
    return { mib: MIB, ms: t, outRatio, inRatio };
  } finally {
    rmSync(work, { recursive: true, force: true });
    await d.stop();
  }
}

/**
 * The SDK against the raw typed client doing the same work (create a sandbox, run `true`,
 * kill it), interleaved, on a warm daemon; target SDK <= 1.1x. And an MCP tool call's round
 * trip through `aegis mcp` driven by the official client: `run_command true` and a call that
 * touches no VM (`list_sandboxes`).
 */
async function benchSdk() {
  const d = await startDaemon(true);
  const { Sandbox } = await import(path.join(ROOT, 'packages/sdk/dist/sdk.mjs'));
  const { Client } = await import('@modelcontextprotocol/sdk/client/index.js');
  const { StdioClientTransport } = await import('@modelcontextprotocol/sdk/client/stdio.js');
  const socketPath = path.join(d.home, 'aegisd.sock');
  try {
    for (let i = 0; i < 600 && !/template \w+: ready/.test(d.log()); i++) await new Promise((r) => setTimeout(r, 100));
    const viaSdk = async () => {
      const t0 = performance.now();
      const sbx = await Sandbox.create({ socketPath, network: 'none' });
      const r = await sbx.commands.run(['true']);
      await sbx.kill();
      if (r.exitCode !== 0) throw new Error('sdk: true failed');
      return performance.now() - t0;
    };
    const viaClient = async () => {
      const t0 = performance.now();
      const inst = await d.client.createInstance({ command: ['sleep', 'infinity'], network: 'none', autoRemove: true });
      for await (const ev of d.client.exec(inst.id, { command: ['true'] }))
        if (ev.type === 'exit' && ev.exitCode !== 0) throw new Error('client: true failed');
      await d.client.deleteInstance(inst.id, { force: true });
      return performance.now() - t0;
    };
    await viaSdk();
    await viaClient();
    const sdk = [];
    const raw = [];
    for (let i = 0; i < RUNS; i++) {
      raw.push(await viaClient());
      sdk.push(await viaSdk());
    }
    const mcp = new Client({ name: 'bench', version: '1' });
    await mcp.connect(new StdioClientTransport({ command: path.join(ROOT, 'bin/aegis'), args: ['mcp'], env: d.env, stderr: 'ignore' }));
    const created = await mcp.callTool({ name: 'create_sandbox', arguments: { network: 'none' } });
    const id = created.structuredContent.id;
    const CALLS = Math.max(10, RUNS * 4);
    const toolRun = [];
    const toolList = [];
    for (let i = 0; i < CALLS; i++) {
      let t0 = performance.now();
      await mcp.callTool({ name: 'run_command', arguments: { sandbox: id, command: 'true' } });
      toolRun.push(performance.now() - t0);
      t0 = performance.now();
      await mcp.callTool({ name: 'list_sandboxes', arguments: {} });
      toolList.push(performance.now() - t0);
    }
    await mcp.callTool({ name: 'delete_sandbox', arguments: { sandbox: id } });
    await mcp.close();
    const ratio = median(sdk) / median(raw);
    console.log(`\nSDK vs the raw typed client, warm daemon, median of ${RUNS}:`);
    console.log(`${'client: createInstance + exec true + delete'.padEnd(56)} median ${fmt(median(raw))}`);
    console.log(`${'SDK: Sandbox.create + commands.run(true) + kill'.padEnd(56)} median ${fmt(median(sdk))}`);
    console.log(`ratio SDK / client: ${ratio.toFixed(2)}x (target <= 1.10x: ${ratio <= 1.1 ? 'met' : 'NOT met'})`);
    console.log(`${'MCP tool call run_command `true` (official client, stdio)'.padEnd(56)} median ${median(toolRun).toFixed(1)} ms`);
    console.log(`${'MCP tool call list_sandboxes (no VM work)'.padEnd(56)} median ${median(toolList).toFixed(1)} ms`);
    return { sdkMs: sdk, clientMs: raw, ratio, mcpRunCommandMs: toolRun, mcpListMs: toolList };
  } finally {
    await d.stop();
  }
}

/**
 * The guest's side of the volume bench: 1,000 small files written (then synced) and read back
 * (page cache dropped first), one 256 MiB file the same way. Timed inside the guest, so only the
 * file system and its device are measured, not exec's round trip. Prints one JSON line.
 */
const FS_WORK = `
import json, os, sys, time
d, small_n, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def drop():
    os.sync()
    with open('/proc/sys/vm/drop_caches', 'w') as f: f.write('3')
out = {}
os.makedirs(d + '/small', exist_ok=True)
data = b'x' * 4096
t = time.monotonic()
for i in range(small_n):
    with open('%s/small/f%d' % (d, i), 'wb') as f: f.write(data)
os.sync(); out['smallWriteMs'] = (time.monotonic() - t) * 1000
drop(); t = time.monotonic(); n = 0
for i in range(small_n):
    with open('%s/small/f%d' % (d, i), 'rb') as f: n += len(f.read())
out['smallReadMs'] = (time.monotonic() - t) * 1000
assert n == small_n * 4096
chunk = bytes(1 << 20); t = time.monotonic()
with open(d + '/big', 'wb') as f:
    for _ in range(big_mib): f.write(chunk)
    f.flush(); os.fsync(f.fileno())
out['bigWriteMs'] = (time.monotonic() - t) * 1000
drop(); t = time.monotonic(); n = 0
with open(d + '/big', 'rb', buffering=0) as f:
    while (b := f.read(1 << 20)): n += len(b)
out['bigReadMs'] = (time.monotonic() - t) * 1000
assert n == big_mib << 20
for i in range(small_n): os.unlink('%s/small/f%d' % (d, i))
os.rmdir(d + '/small'); os.unlink(d + '/big'); os.sync()
print(json.dumps(out))`;

/**
 * Volumes against the guest's own scratch disk, on one VM that has both kinds attached: the same
 * file work in /root (the overlay root on the scratch disk), on a named volume and on a host
 * directory, interleaved round by round so drift hits all three alike. Target: the named volume
 * >= 90% of the scratch disk (as rates; per phase and over the whole work).
 */
async function benchVolumes() {
  const d = await startDaemon(false);
  const share = mkdtempSync('/tmp/aegis-bench-share-');
  const SMALL = Number(process.env.BENCH_VOLUME_FILES ?? 1000);
  const BIG_MIB = Number(process.env.BENCH_VOLUME_MIB ?? 256);
  const targets = { scratch: '/root/bench', volume: '/vol/bench', share: '/share/bench' };
  try {
    await d.client.createInstance({
      handle: 'bench-vol',
      command: ['sleep', '3600'],
      network: 'none',
      memoryMiB: 1024,
      volumes: [
        { type: 'volume', source: 'bench', target: '/vol' },
        { type: 'bind', source: share, target: '/share' },
      ],
    });
    const work = async (dir) => {
      let stdout = '';
      for await (const ev of d.client.exec('bench-vol', { command: ['python3', '-c', FS_WORK, dir, String(SMALL), String(BIG_MIB)] })) {
        if (ev.type === 'output' && ev.stream === 'stdout') stdout += Buffer.from(ev.data, 'base64').toString();
        if (ev.type === 'exit' && ev.exitCode !== 0) throw new Error(`the file work in ${dir} failed (${ev.exitCode})`);
      }
      return JSON.parse(stdout);
    };
    // One warm-up each: TCG translates the guest's code paths the first time through.
    for (const dir of Object.values(targets)) await work(dir);
    const t = Object.fromEntries(Object.keys(targets).map((k) => [k, []]));
    for (let i = 0; i < RUNS; i++) {
      // Rotate who goes first, so no target always runs on the cache state another left.
      const order = Object.keys(targets);
      for (let j = 0; j < i % order.length; j++) order.push(order.shift());
      for (const k of order) t[k].push(await work(targets[k]));
    }
    const phases = ['smallWriteMs', 'smallReadMs', 'bigWriteMs', 'bigReadMs'];
    const med = (k, p) => median(t[k].map((r) => r[p]));
    const total = (k) => median(t[k].map((r) => phases.reduce((a, p) => a + r[p], 0)));
    console.log(`\nvolumes vs the guest's scratch disk, same VM, median of ${RUNS} (times inside the guest):`);
    console.log(
      `${''.padEnd(40)}${['write 1k files', 'read 1k files', `write ${BIG_MIB} MiB`, `read ${BIG_MIB} MiB`, 'all'].map((h) => h.padStart(15)).join('')}`,
    );
    const names = {
      scratch: 'scratch disk (/root, overlay on ext4)',
      volume: 'named volume (ext4 disk)',
      share: 'host directory (9p, mapped-xattr)',
    };
    for (const k of Object.keys(targets)) {
      console.log(`${names[k].padEnd(40)}${[...phases.map((p) => med(k, p)), total(k)].map((ms) => fmt(ms).padStart(15)).join('')}`);
    }
    const pct = (k, p) => `${((med('scratch', p) / med(k, p)) * 100).toFixed(0)}%`;
    for (const k of ['volume', 'share']) {
      console.log(
        `${`${k} / scratch (rate)`.padEnd(40)}${[...phases.map((p) => pct(k, p)), `${((total('scratch') / total(k)) * 100).toFixed(0)}%`].map((x) => x.padStart(15)).join('')}`,
      );
    }
    const ratio = total('scratch') / total('volume');
    const worst = Math.min(...phases.map((p) => med('scratch', p) / med('volume', p)));
    console.log(
      `\nnamed volume / scratch disk: ${(ratio * 100).toFixed(0)}% over the whole work, ${(worst * 100).toFixed(0)}% in its worst phase (target >= 90%: ${ratio >= 0.9 ? 'met' : 'NOT met'})`,
    );
    await d.client.deleteInstance('bench-vol', { force: true });
    return {
      smallFiles: SMALL,
      bigMiB: BIG_MIB,
      runs: t,
      volumeRatio: ratio,
      volumeWorstPhaseRatio: worst,
      shareRatio: total('scratch') / total('share'),
    };
  } finally {
    rmSync(share, { recursive: true, force: true });
    await d.stop();
  }
}

/** Time from a client `run` request to its `end` event (the API client, no CLI start). */
async function apiRun(client) {
  const t0 = performance.now();
  let code;
  for await (const ev of client.run({ command: ['true'], autoRemove: true })) if (ev.type === 'end') code = ev.exitCode;
  if (code !== 0) throw new Error(`run ended with ${code}`);
  return performance.now() - t0;
}

/**
 * Issue 14: `aegis run -- true`, CLI start to exit code, on three daemons of the bench's own:
 * cold (kernel boot), template-warm (restored from a snapshot, no pool) and pooled (a paused,
 * warmed-up VM taken from the pool), median of >= 10 each, interleaved round by round; the
 * same through the API client; and sequential runs per minute, back to back (the pool then
 * refills as fast as it can, and a run that finds it empty restores from the template).
 * Target: cold / pooled >= 10x.
 */
async function benchPool() {
  const N = Math.max(10, Number(process.env.BENCH_POOL_RUNS ?? 10));
  const cold = await startDaemon(false);
  const warm = await startDaemon(true);
  const pooled = await startDaemon(true, { AEGIS_POOL_SIZE: '2' });
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const poolReady = async (n = 1) => {
    for (let i = 0; i < 1800; i++) {
      if (((await pooled.client.status()).pool?.ready ?? 0) >= n) return;
      await sleep(100);
    }
    throw new Error(`the pool never had ${n} ready VM(s):\n${pooled.log()}`);
  };
  try {
    for (let i = 0; i < 600 && !/template \w+: ready/.test(warm.log()); i++) await sleep(100);
    // One of each first: templates built, guest code paths translated once.
    await aegisRun(cold.env);
    await aegisRun(warm.env);
    await poolReady(2);
    await aegisRun(pooled.env);
    const t = { cold: [], warm: [], pooled: [], apiCold: [], apiWarm: [], apiPooled: [] };
    for (let i = 0; i < N; i++) {
      t.cold.push(await aegisRun(cold.env));
      t.apiCold.push(await apiRun(cold.client));
      t.warm.push(await aegisRun(warm.env));
      t.apiWarm.push(await apiRun(warm.client));
      await poolReady(2);
      t.pooled.push(await aegisRun(pooled.env));
      t.apiPooled.push(await apiRun(pooled.client));
    }
    const taken = (pooled.log().match(/: from the warm pool/g) ?? []).length;
    if (taken < 2 * N) throw new Error(`only ${taken} of ${2 * N + 1} pooled runs came from the pool`);
    // Back to back: as many runs as a minute allows, at most 40.
    await poolReady(2);
    const before = taken;
    const seq = [];
    const t0 = performance.now();
    while (seq.length < 40 && performance.now() - t0 < 60_000) seq.push(await aegisRun(pooled.env));
    const seqMs = performance.now() - t0;
    const seqFromPool = (pooled.log().match(/: from the warm pool/g) ?? []).length - before;
    const coldSeq = [];
    const c0 = performance.now();
    while (coldSeq.length < 10 && performance.now() - c0 < 60_000) coldSeq.push(await aegisRun(cold.env));
    const coldSeqMs = performance.now() - c0;

    console.log(`\n\`aegis run -- true\`, CLI start to exit code, median of ${N} each (3 daemons, interleaved):`);
    const rows = [
      ['cold (kernel boot, Node start)', t.cold, t.apiCold],
      ['template-warm (restored from a snapshot)', t.warm, t.apiWarm],
      ['pooled (a paused, warmed-up VM resumed)', t.pooled, t.apiPooled],
    ];
    console.log(`${''.padEnd(44)} ${'CLI'.padStart(9)} ${'API client'.padStart(11)}`);
    for (const [name, cli, api] of rows) console.log(`${name.padEnd(44)} ${fmt(median(cli)).padStart(9)} ${fmt(median(api)).padStart(11)}`);
    const ratio = median(t.cold) / median(t.pooled);
    const apiRatio = median(t.apiCold) / median(t.apiPooled);
    console.log(
      `\nratio cold / pooled: CLI ${ratio.toFixed(1)}x (target >= 10x: ${ratio >= 10 ? 'met' : 'NOT met'}), API client ${apiRatio.toFixed(1)}x; ` +
        `cold / template-warm: ${(median(t.cold) / median(t.warm)).toFixed(1)}x`,
    );
    const perMin = (n, ms) => (n / ms) * 60_000;
    console.log(
      `sequential runs per minute: pooled ${perMin(seq.length, seqMs).toFixed(0)} (${seq.length} runs, ${seqFromPool} from the pool, the rest restored while it refilled); ` +
        `cold ${perMin(coldSeq.length, coldSeqMs).toFixed(0)}`,
    );
    return {
      runs: N,
      ms: t,
      ratio,
      apiRatio,
      sequential: { pooled: { runs: seq.length, ms: seqMs, fromPool: seqFromPool }, cold: { runs: coldSeq.length, ms: coldSeqMs } },
    };
  } finally {
    await cold.stop();
    await warm.stop();
    await pooled.stop();
  }
}

/** Key figures of /proc/<pid>/smaps_rollup, in KiB; undefined when the process is gone. */
function smapsRollup(pid) {
  try {
    const out = {};
    for (const line of readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8').split('\n')) {
      const m = /^(\w+):\s+(\d+) kB$/.exec(line);
      if (m) out[m[1]] = Number(m[2]);
    }
    return out;
  } catch {
    return undefined;
  }
}

/** CPU time (user + system) of a process so far, in ms. */
function cpuMs(pid) {
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100; // utime, stime in USER_HZ (100)
  } catch {
    return 0;
  }
}

/** The VMM and passt processes of one instance: their command lines name its directory. */
function processesOf(home, id) {
  const found = { vmm: [], passt: [] };
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let cmdline = '';
    try {
      cmdline = readFileSync(`/proc/${name}/cmdline`, 'utf8');
    } catch {
      continue;
    }
    const argv0 = cmdline.split('\0')[0];
    // passt run by root keeps its socket under /run/aegis/passt/<id> (it cannot reach AEGIS_HOME).
    if (!cmdline.includes(`${home}/instances/${id}/`) && !(argv0.includes('passt') && cmdline.includes(`/passt/${id}/`))) continue;
    if (argv0.includes('passt')) found.passt.push(Number(name));
    else if (/qemu-system|firecracker/.test(argv0)) found.vmm.push(Number(name));
  }
  return found;
}

function memAvailableKiB() {
  return Number(/^MemAvailable:\s+(\d+) kB$/m.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
}

/**
 * Idle pause (issue 14): what waking costs a caller, and what an idle instance costs the host.
 * Wake: `aegis exec <h> -- true` (CLI to exit) and the first response byte of a new TCP
 * connection through --expose (connect to first byte), each on an idle-paused instance and
 * then at once on the same instance running, interleaved, median of BENCH_IDLE_RUNS (>= 10).
 * Density: BENCH_IDLE_N instances (default 8; default shape: 512 MiB, passt network), the CPU
 * their VMMs use while they run idle and once they are idle-paused, the PSS of each VMM and its
 * passt from smaps_rollup, and the count that would fit in MemAvailable, extrapolated from N.
 */
async function benchIdle() {
  const RUNS_IDLE = Math.max(10, Number(process.env.BENCH_IDLE_RUNS ?? 10));
  const N = Number(process.env.BENCH_IDLE_N ?? 8);
  const d = await startDaemon(true);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  const untilPaused = async (h, withinMs = 60_000) => {
    for (const t0 = Date.now(); Date.now() - t0 < withinMs; await sleep(50)) {
      const i = await d.client.getInstance(h);
      if (i.idlePaused) return;
      if (i.state !== 'running') throw new Error(`${h} is ${i.state}`);
    }
    throw new Error(`${h} was not idle-paused within ${withinMs} ms`);
  };
  /** Connect to the first byte of the answer to a small GET on a new connection. */
  const firstByte = (port) =>
    new Promise((resolve, reject) => {
      const t0 = performance.now();
      const c = net.connect(port, '127.0.0.1', () => c.write('GET /small HTTP/1.0\r\n\r\n'));
      c.once('data', () => {
        resolve(performance.now() - t0);
        c.destroy();
      });
      c.on('error', reject);
    });
  try {
    for (let i = 0; i < 600 && !/template \w+: ready/.test(d.log()); i++) await sleep(100);
    const status = await d.client.status();
    console.log(`\nidle pause (${status.backend.detail}):`);

    // Wake by exec: one instance, 1 s idle time; each round waits for the pause, then execs twice.
    await d.client.createInstance({ handle: 'idle-exec', command: ['sleep', 'infinity'], idlePauseMs: 1000 });
    const exec = { paused: [], running: [], apiPaused: [], apiRunning: [] };
    await aegisExec(d.env, 'idle-exec');
    for (let i = 0; i < RUNS_IDLE; i++) {
      await untilPaused('idle-exec');
      exec.paused.push(await aegisExec(d.env, 'idle-exec'));
      exec.running.push(await aegisExec(d.env, 'idle-exec'));
      await untilPaused('idle-exec');
      exec.apiPaused.push((await apiExec(d.client, 'idle-exec')).ms);
      exec.apiRunning.push((await apiExec(d.client, 'idle-exec')).ms);
    }
    await d.client.deleteInstance('idle-exec', { force: true });

    // Wake by a connection: a guest web server behind --expose (its request log is use, so the
    // idle time starts after each answer).
    const web = await d.client.createInstance({
      handle: 'idle-web',
      command: ['sh', '-c', 'echo hi > /tmp/small && exec python3 -m http.server 8000 --directory /tmp'],
      exposes: [{ guestPort: 8000 }],
      idlePauseMs: 1000,
    });
    const port = web.ports[0].hostPort;
    for (let i = 0; ; i++) {
      try {
        await firstByte(port);
        break;
      } catch (err) {
        if (i > 300) throw err;
        await sleep(200);
      }
    }
    const tcp = { paused: [], running: [] };
    for (let i = 0; i < RUNS_IDLE; i++) {
      await untilPaused('idle-web');
      tcp.paused.push(await firstByte(port));
      tcp.running.push(await firstByte(port));
    }
    await d.client.deleteInstance('idle-web', { force: true });
    // The daemon's own part of a wake: QMP `cont` and the state change, from its log.
    const resumeMs = [...d.log().matchAll(/woken by .* in (\d+) ms/g)].map((m) => Number(m[1]));

    const ms = (xs) => `${median(xs).toFixed(1)} ms`;
    console.log(`wake-from-idle latency, median of ${RUNS_IDLE} each (paused and running interleaved, same instance):`);
    console.log(`${'`aegis exec <h> -- true`, running (reference)'.padEnd(56)} median ${ms(exec.running)}`);
    console.log(`${'`aegis exec <h> -- true`, idle-paused'.padEnd(56)} median ${ms(exec.paused)}`);
    console.log(`${'exec `true` through the API client, running (reference)'.padEnd(56)} median ${ms(exec.apiRunning)}`);
    console.log(`${'exec `true` through the API client, idle-paused'.padEnd(56)} median ${ms(exec.apiPaused)}`);
    console.log(`${'new TCP conn. via --expose, first byte, running'.padEnd(56)} median ${ms(tcp.running)}`);
    console.log(`${'new TCP conn. via --expose, first byte, idle-paused'.padEnd(56)} median ${ms(tcp.paused)}`);
    console.log(`${"aegisd's resume (QMP cont + state), from its log".padEnd(56)} median ${ms(resumeMs)} (${resumeMs.length} wakes)`);
    console.log(
      `wake adds: exec (CLI) ${(median(exec.paused) - median(exec.running)).toFixed(1)} ms, ` +
        `exec (API) ${(median(exec.apiPaused) - median(exec.apiRunning)).toFixed(1)} ms, ` +
        `TCP first byte ${(median(tcp.paused) - median(tcp.running)).toFixed(1)} ms`,
    );

    // Density: N instances of the default shape, idle long enough to measure them running first.
    const availableKiB = memAvailableKiB();
    const idleMs = 20_000 + 5000 * N;
    const handles = [];
    for (let i = 0; i < N; i++) {
      const inst = await d.client.createInstance({ handle: `idle-${i}`, command: ['sleep', 'infinity'], idlePauseMs: idleMs });
      handles.push({ h: inst.handle, id: inst.id });
    }
    const procs = handles.map(({ h, id }) => ({ h, ...processesOf(d.home, id) }));
    const pids = procs.flatMap((p) => [...p.vmm, ...p.passt]);
    const cpuOver = async (windowMs) => {
      const before = pids.map(cpuMs);
      await sleep(windowMs);
      const used = pids.map(cpuMs).reduce((a, x, i) => a + x - before[i], 0);
      return (used / windowMs) * 100;
    };
    const running = (await d.client.listInstances()).filter((i) => i.state === 'running' && !i.idlePaused).length;
    const cpuRunning = await cpuOver(3000);
    const pssRunning = procs.map((p) => [...p.vmm, ...p.passt].reduce((a, pid) => a + (smapsRollup(pid)?.Pss ?? 0), 0));
    for (const { h } of handles) await untilPaused(h, idleMs + 60_000);
    const cpuPaused = await cpuOver(3000);
    const per = procs.map((p) => {
      const vmm = p.vmm.map(smapsRollup).filter(Boolean);
      const passt = p.passt.map(smapsRollup).filter(Boolean);
      const sum = (xs, k) => xs.reduce((a, x) => a + (x[k] ?? 0), 0);
      return {
        handle: p.h,
        vmmPids: p.vmm,
        passtPids: p.passt,
        vmmPssKiB: sum(vmm, 'Pss'),
        passtPssKiB: sum(passt, 'Pss'),
        pssKiB: sum(vmm, 'Pss') + sum(passt, 'Pss'),
        privateKiB: sum([...vmm, ...passt], 'Private_Clean') + sum([...vmm, ...passt], 'Private_Dirty'),
        rssKiB: sum([...vmm, ...passt], 'Rss'),
      };
    });
    for (const { h } of handles) await d.client.deleteInstance(h, { force: true });
    const mib = (kib) => `${(kib / 1024).toFixed(1)} MiB`;
    console.log(`\nidle density: ${N} instances (512 MiB guests, passt network, restored from the template), idle-paused:`);
    for (const p of per) {
      console.log(
        `  ${p.handle.padEnd(8)} VMM pid ${p.vmmPids.join(',')} PSS ${mib(p.vmmPssKiB)}; passt pid ${p.passtPids.join(',') || '-'} PSS ${mib(p.passtPssKiB)}; ` +
          `private ${mib(p.privateKiB)}, RSS ${mib(p.rssKiB)}`,
      );
    }
    const medPss = median(per.map((p) => p.pssKiB));
    const fits = Math.floor(availableKiB / medPss);
    console.log(`${'PSS per instance (VMM + passt), idle-paused'.padEnd(56)} median ${mib(medPss)}`);
    console.log(`${'PSS per instance, earlier while running idle'.padEnd(56)} median ${mib(median(pssRunning))}`);
    console.log(
      `${'private memory per instance (not shared with any other)'.padEnd(56)} median ${mib(median(per.map((p) => p.privateKiB)))}`,
    );
    console.log(`${`CPU of all ${N} VMMs + passt, running idle (${running} running)`.padEnd(56)} ${cpuRunning.toFixed(1)}% of one CPU`);
    console.log(`${`CPU of all ${N} VMMs + passt, idle-paused`.padEnd(56)} ${cpuPaused.toFixed(1)}% of one CPU`);
    console.log(
      `MemAvailable before they started: ${mib(availableKiB)}; at the median PSS that is ~${fits} idle instances ` +
        `(EXTRAPOLATED from ${N} measured, not started; guests that touch more of their 512 MiB cost more)`,
    );
    return {
      wake: { execCliMs: exec, tcpFirstByteMs: tcp, daemonResumeMs: resumeMs },
      density: {
        n: N,
        perInstance: per,
        medianPssKiB: medPss,
        pssRunningKiB: pssRunning,
        memAvailableKiB: availableKiB,
        extrapolatedFit: fits,
      },
      cpuPercent: { running: cpuRunning, runningCount: running, paused: cpuPaused },
    };
  } finally {
    await d.stop();
  }
}

/** PSS (KiB) of an instance's host processes (VMM and passt); 0 when it has none. */
function instancePssKiB(home, id) {
  const { vmm, passt } = processesOf(home, id);
  return [...vmm, ...passt].reduce((sum, pid) => sum + (smapsRollup(pid)?.Pss ?? 0), 0);
}

/**
 * Hibernation beside the cold boots `cold` measured in the same run: an instance with a
 * process holding 64 MiB hibernated (time, the state file's size), the host memory of its
 * processes before and after (after: none, nothing but aegisd's bookkeeping), then woken by
 * `instance resume` (hibernated to running) and by an exec (to the exec's exit).
 */
async function benchHibernation(d, cold) {
  const ref = 'bench-hib';
  const inst = await d.client.createInstance({ handle: ref, command: ['sleep', 'infinity'], network: 'user' });
  const hold = ['import time', 'b = bytearray(64 << 20)', 'for i in range(0, len(b), 4096): b[i] = 1', 'time.sleep(1e6)'].join('\n');
  await d.client.execDetached(ref, { command: ['python3', '-c', hold] });
  await new Promise((r) => setTimeout(r, 3000));
  const hibernateMs = [];
  const resumeMs = [];
  const execWakeMs = [];
  const pssRunning = [];
  const pssAsleep = [];
  const daemonRss = [];
  const rssOf = (pid) => Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
  for (let i = 0; i < RUNS; i++) {
    for (const wake of ['resume', 'exec']) {
      pssRunning.push(instancePssKiB(d.home, inst.id));
      let t0 = performance.now();
      await d.client.hibernateInstance(ref);
      hibernateMs.push(performance.now() - t0);
      pssAsleep.push(instancePssKiB(d.home, inst.id));
      daemonRss.push(rssOf(d.pid));
      t0 = performance.now();
      if (wake === 'resume') {
        await d.client.resumeInstance(ref);
        resumeMs.push(performance.now() - t0);
      } else {
        await apiExec(d.client, ref);
        execWakeMs.push(performance.now() - t0);
      }
    }
  }
  await d.client.deleteInstance(ref, { force: true });
  const mib = (kib) => `${(kib / 1024).toFixed(1)} MiB`;
  const ratio = median(cold) / median(resumeMs);
  console.log(`\nhibernation (512 MiB guest, 64 MiB held by a process, user network), median of ${RUNS}:`);
  console.log(`${'hibernate (save, VMM ended)'.padEnd(56)} median ${fmt(median(hibernateMs))}`);
  console.log(`${'wake: instance resume (hibernated to running)'.padEnd(56)} median ${fmt(median(resumeMs))}`);
  console.log(`${'wake: exec true on a hibernated instance (to its exit)'.padEnd(56)} median ${fmt(median(execWakeMs))}`);
  console.log(`${'cold boot (create to running, measured above)'.padEnd(56)} median ${fmt(median(cold))}`);
  console.log(`wake from hibernation is ${ratio.toFixed(1)}x faster than a cold boot (target: >= 3x)`);
  console.log(
    `${'host PSS of its VMM + passt: running / hibernated'.padEnd(56)} median ${mib(median(pssRunning))} / ${mib(median(pssAsleep))}` +
      ` (aegisd RSS meanwhile ${mib(median(daemonRss))})`,
  );
  return {
    hibernateMs,
    resumeMs,
    execWakeMs,
    coldMs: cold,
    speedup: ratio,
    pssRunningKiB: pssRunning,
    pssHibernatedKiB: pssAsleep,
    daemonRssKiB: daemonRss,
  };
}

/**
 * Events (issue 24): how long a lifecycle change takes to reach a subscriber of `GET
 * /v1/events` (the event's own time to its arrival, one clock), over pause/resume cycles of
 * one instance; and how long a `/metrics` scrape takes with that instance running.
 */
async function benchEvents() {
  const d = await startDaemon(false);
  try {
    await d.client.createInstance({ handle: 'bench-ev', command: ['sleep', 'infinity'], network: 'none' });
    const lags = [];
    const stop = new globalThis.AbortController();
    const following = (async () => {
      try {
        for await (const ev of d.client.events({ follow: true, instances: ['bench-ev'], signal: stop.signal })) {
          if (ev.type === 'pause' || ev.type === 'resume') lags.push(Date.now() - ev.timeMs);
        }
      } catch {
        // aborted
      }
    })();
    await new Promise((r) => setTimeout(r, 300));
    const cycles = Math.max(10, RUNS * 4);
    for (let i = 0; i < cycles; i++) {
      await d.client.pauseInstance('bench-ev');
      await d.client.resumeInstance('bench-ev');
    }
    await new Promise((r) => setTimeout(r, 300));
    stop.abort();
    await following;
    const scrapes = [];
    for (let i = 0; i < RUNS; i++) {
      const t0 = performance.now();
      await new Promise((resolve, reject) =>
        http
          .get({ socketPath: path.join(d.home, 'aegisd.sock'), path: '/metrics' }, (res) => res.resume().on('end', resolve))
          .on('error', reject),
      );
      scrapes.push(performance.now() - t0);
    }
    await d.client.deleteInstance('bench-ev', { force: true });
    console.log(`\nevents, median of ${lags.length} (pause/resume of one instance):`);
    console.log(`${'event time to a subscriber receiving it'.padEnd(56)} median ${median(lags).toFixed(1)} ms (target < 50 ms)`);
    console.log(`${'GET /metrics with one running instance'.padEnd(56)} median ${median(scrapes).toFixed(1)} ms`);
    return { deliveryMs: lags, metricsScrapeMs: scrapes };
  } finally {
    await d.stop();
  }
}

/** aegisd's CPU time so far (user + system), in seconds, from /proc. */
function processCpuSeconds(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/**
 * The dashboard (issue 24): what an open dashboard listing N instances (50 by default,
 * BENCH_UI_INSTANCES) costs aegisd's CPU while nothing happens: windows of the same length with
 * the page closed and open, alternated, each aegisd's CPU seconds over wall seconds. The
 * instances are paused (`sleep infinity`, then pause); the page keeps its event stream open and
 * scrapes /metrics (host figures of all 50) for its sparklines every 5 s.
 */
async function benchUi() {
  const { chromium } = await import('playwright-core');
  const executablePath = process.env.AEGIS_CHROMIUM ?? ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));
  if (!executablePath) throw new Error('no chromium (apt-get install chromium, or set AEGIS_CHROMIUM)');
  const count = Number(process.env.BENCH_UI_INSTANCES ?? 50);
  const windowMs = Number(process.env.BENCH_UI_WINDOW_MS ?? 20_000);
  const d = await startDaemon(true, { AEGIS_UI_ADDR: '127.0.0.1:0' });
  const browser = await chromium.launch({ executablePath, args: ['--no-sandbox'] });
  try {
    // The first instance boots cold and leaves a template; the rest are restored from it. Each
    // is paused once up: 50 idle guests running under TCG saturate 2 cores (the 43rd's agent
    // missed its 60 s deadline), which would measure the host's load, not the dashboard.
    await d.client.createInstance({ handle: 'ui-0', command: ['sleep', 'infinity'], network: 'none' });
    await d.client.pauseInstance('ui-0');
    for (let i = 0; i < 600 && !/template \w+: ready/.test(d.log()); i++) await new Promise((r) => setTimeout(r, 100));
    for (let i = 1; i < count; i++) {
      await d.client.createInstance({ handle: `ui-${i}`, command: ['sleep', 'infinity'], network: 'none' });
      await d.client.pauseInstance(`ui-${i}`);
    }
    const url = readFileSync(path.join(d.home, 'ui.addr'), 'utf8').trim();
    const token = readFileSync(path.join(d.home, 'ui.token'), 'utf8').trim();
    // Settled: the last boots' work done before anything is measured.
    await new Promise((r) => setTimeout(r, 5000));
    const measure = async () => {
      const c0 = processCpuSeconds(d.pid);
      const t0 = performance.now();
      await new Promise((r) => setTimeout(r, windowMs));
      return ((processCpuSeconds(d.pid) - c0) / ((performance.now() - t0) / 1000)) * 100;
    };
    const closed = [];
    const open = [];
    for (let i = 0; i < RUNS; i++) {
      closed.push(await measure());
      const page = await browser.newPage();
      await page.goto(`${url}/?token=${token}`);
      // Counted from outside the page: its CSP forbids evaluating strings in it.
      const rows = page.locator('tr[data-id][data-state="paused"]');
      for (let t = 0; t < 600 && (await rows.count()) < count; t++) await new Promise((r) => setTimeout(r, 100));
      if ((await rows.count()) < count) throw new Error(`the dashboard listed ${await rows.count()} of ${count} instances`);
      open.push(await measure());
      await page.close();
    }
    const added = median(open) - median(closed);
    console.log(`\ndashboard, ${count} (paused) instances listed, medians of ${RUNS} windows of ${windowMs / 1000} s:`);
    console.log(`${'aegisd CPU, no dashboard open'.padEnd(56)} median ${median(closed).toFixed(2)} % of a core`);
    console.log(`${'aegisd CPU, the dashboard open (events + /metrics)'.padEnd(56)} median ${median(open).toFixed(2)} % of a core`);
    console.log(`${'added by the open dashboard'.padEnd(56)} ${added.toFixed(2)} points (target < 5)`);
    return { instances: count, closedCpuPercent: closed, openCpuPercent: open };
  } finally {
    await browser.close();
    for (const i of await d.client.listInstances({ all: true }).catch(() => [])) {
      await d.client.deleteInstance(i.id, { force: true }).catch(() => undefined);
    }
    await d.stop();
  }
}

/**
 * Checkpoints (issue 22): the time an instance is paused for `snapshot create` and the space the
 * snapshot takes, with 128 and 512 MiB of guest memory touched; an instance started from a
 * snapshot vs. a cold boot (create to running, interleaved); and `fork -n 4` in all.
 */
async function benchCheckpoint() {
  const d = await startDaemon(false);
  const untilReady = async (ref) => {
    for await (const ev of d.client.exec(ref, { command: ['sh', '-c', 'while [ ! -e /tmp/touched ]; do sleep 0.2; done'] })) void ev;
  };
  try {
    console.log(`\ncheckpoints (1024 MiB guest), median of ${RUNS}:`);
    const sizes = {};
    for (const touchMiB of [128, 512]) {
      const ref = `bench-ckpt-${touchMiB}`;
      await d.client.createInstance({ handle: ref, command: ['sleep', 'infinity'], network: 'none', memoryMiB: 1024 });
      // A process that holds N MiB it has written (random bytes: nothing for zero-page elision).
      const touch = [
        'import os, time',
        `b = bytearray(${touchMiB} << 20)`,
        'for i in range(0, len(b), 1 << 20): b[i:i + (1 << 20)] = os.urandom(1 << 20)',
        "open('/tmp/touched', 'w').close()",
        'time.sleep(1e6)',
      ].join('\n');
      await d.client.execDetached(ref, { command: ['python3', '-c', touch] });
      await untilReady(ref);
      const ms = [];
      let size = 0;
      for (let i = 0; i < RUNS; i++) {
        const t0 = performance.now();
        const snap = await d.client.createSnapshot(ref, { name: `${ref}-${i}` });
        ms.push(performance.now() - t0);
        size = snap.sizeBytes;
        await d.client.deleteSnapshot(snap.name);
      }
      sizes[touchMiB] = { ms, sizeBytes: size };
      console.log(
        `${`snapshot create, ${touchMiB} MiB touched`.padEnd(56)} median ${fmt(median(ms))}  size ${(size / (1 << 20)).toFixed(0)} MiB`,
      );
      await d.client.deleteInstance(ref, { force: true });
    }
    await d.client.createInstance({ handle: 'bench-src', command: ['sleep', 'infinity'], network: 'none' });
    await d.client.createSnapshot('bench-src', { name: 'bench-src-snap' });
    const cold = [];
    const restored = [];
    for (let i = 0; i < RUNS; i++) {
      let t0 = performance.now();
      await d.client.createInstance({ handle: `bench-cold-${i}`, command: ['sleep', 'infinity'], network: 'none' });
      cold.push(performance.now() - t0);
      t0 = performance.now();
      await d.client.createInstance({ handle: `bench-restored-${i}`, snapshot: 'bench-src-snap' });
      restored.push(performance.now() - t0);
      for (const h of [`bench-cold-${i}`, `bench-restored-${i}`]) await d.client.deleteInstance(h, { force: true });
    }
    console.log(`${'cold boot (create to running)'.padEnd(56)} median ${fmt(median(cold))}`);
    console.log(`${'start from a snapshot (create to running)'.padEnd(56)} median ${fmt(median(restored))}`);
    const speedup = median(cold) / median(restored);
    console.log(`start from a snapshot is ${speedup.toFixed(1)}x faster than a cold boot`);
    const forkMs = [];
    for (let i = 0; i < Math.min(RUNS, 3); i++) {
      const t0 = performance.now();
      const r = await d.client.forkInstance('bench-src', { count: 4 });
      forkMs.push(performance.now() - t0);
      for (const inst of r.instances) await d.client.deleteInstance(inst.id, { force: true });
    }
    console.log(`${'fork -n 4 (checkpoint + 4 starts)'.padEnd(56)} median ${fmt(median(forkMs))} (${forkMs.length} runs)`);
    await d.client.deleteInstance('bench-src', { force: true });
    await d.client.deleteSnapshot('bench-src-snap');
    const hibernation = await benchHibernation(d, cold);
    return { checkpoint: sizes, coldMs: cold, restoredMs: restored, speedup, fork4Ms: forkMs, hibernation };
  } finally {
    await d.stop();
  }
}

/**
 * E2B's own SDK (`e2b`, the pinned devDependency) against the E2B endpoint, beside the CLI doing
 * the same work on the same daemon, interleaved: `Sandbox.create()` + `commands.run('true')` +
 * `kill()` vs `aegis run -- true` (target <= 1.5x), and `files.write` / `files.read` of 64 MiB
 * (the SDK's default encodings: multipart up, bytes down) vs `aegis cp` in and out of the same
 * sandbox (target >= 80% of cp's throughput, i.e. at most 1.25x its time).
 */
async function benchE2b() {
  const d = await startDaemon(true, { AEGIS_E2B_ADDR: '127.0.0.1:0' });
  const work = mkdtempSync('/tmp/aegis-bench-e2b-');
  try {
    for (let i = 0; i < 600 && !/template \w+: ready/.test(d.log()); i++) await new Promise((r) => setTimeout(r, 100));
    const url = readFileSync(path.join(d.home, 'e2b.addr'), 'utf8').trim();
    process.env.E2B_API_URL = url;
    process.env.E2B_SANDBOX_URL = url;
    process.env.E2B_API_KEY = readFileSync(path.join(d.home, 'e2b.key'), 'utf8').trim();
    const { Sandbox } = await import('e2b');
    const viaE2b = async () => {
      const t0 = performance.now();
      const sbx = await Sandbox.create();
      await sbx.commands.run('true');
      await sbx.kill();
      return performance.now() - t0;
    };
    await viaE2b();
    await aegisRun(d.env);
    const e2b = [];
    const cli = [];
    for (let i = 0; i < RUNS; i++) {
      cli.push(await aegisRun(d.env));
      e2b.push(await viaE2b());
    }
    const ratio = median(e2b) / median(cli);
    console.log(`\nE2B SDK vs the CLI, warm daemon, median of ${RUNS}:`);
    console.log(`${'`aegis run -- true`'.padEnd(56)} median ${fmt(median(cli))}`);
    console.log(`${"e2b: Sandbox.create + commands.run('true') + kill".padEnd(56)} median ${fmt(median(e2b))}`);
    console.log(`ratio e2b / aegis run: ${ratio.toFixed(2)}x (target <= 1.50x: ${ratio <= 1.5 ? 'met' : 'NOT met'})`);

    const MIB = Number(process.env.BENCH_E2B_MIB ?? 64);
    const FILE_RUNS = Math.min(RUNS, Number(process.env.BENCH_E2B_FILE_RUNS ?? 3));
    const data = randomBytes(MIB << 20);
    const local = path.join(work, 'blob');
    writeFileSync(local, data);
    const sbx = await Sandbox.create({ timeoutMs: 3_600_000 });
    const A = path.join(ROOT, 'bin/aegis');
    const sdkWrite = async () => {
      const t0 = performance.now();
      await sbx.files.write('/root/sdk.bin', data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
      return performance.now() - t0;
    };
    const sdkRead = async () => {
      const t0 = performance.now();
      const got = await sbx.files.read('/root/sdk.bin', { format: 'bytes' });
      if (got.length !== data.length) throw new Error(`e2b read ${got.length} of ${data.length} bytes`);
      return performance.now() - t0;
    };
    const cpIn = () => wallMs(A, ['cp', local, `${sbx.sandboxId}:/root/cp.bin`], d.env);
    const cpOut = () => {
      rmSync(path.join(work, 'out'), { force: true });
      return wallMs(A, ['cp', `${sbx.sandboxId}:/root/cp.bin`, path.join(work, 'out')], d.env);
    };
    const rows = { sdkWrite: [], cpIn: [], sdkRead: [], cpOut: [] };
    try {
      await sdkWrite();
      await cpIn();
      for (let i = 0; i < FILE_RUNS; i++) {
        rows.cpIn.push(await cpIn());
        rows.sdkWrite.push(await sdkWrite());
        rows.cpOut.push(await cpOut());
        rows.sdkRead.push(await sdkRead());
      }
    } finally {
      // A daemon's stop leaves VMs running: this one goes first, whatever happened.
      await sbx.kill();
    }
    const rate = (ms) => `${((MIB / ms) * 1000).toFixed(1)} MiB/s`;
    console.log(`\n${MIB} MiB in and out of a sandbox, median of ${FILE_RUNS}:`);
    for (const [name, xs] of [
      ['`aegis cp` in', rows.cpIn],
      ['e2b files.write (multipart)', rows.sdkWrite],
      ['`aegis cp` out', rows.cpOut],
      ["e2b files.read (format 'bytes')", rows.sdkRead],
    ]) {
      console.log(`${name.padEnd(56)} median ${fmt(median(xs))}  ${rate(median(xs))}`);
    }
    const writeShare = median(rows.cpIn) / median(rows.sdkWrite);
    const readShare = median(rows.cpOut) / median(rows.sdkRead);
    console.log(
      `e2b write / cp in throughput: ${(writeShare * 100).toFixed(0)}% (target >= 80%: ${writeShare >= 0.8 ? 'met' : 'NOT met'})`,
    );
    console.log(`e2b read / cp out throughput: ${(readShare * 100).toFixed(0)}% (target >= 80%: ${readShare >= 0.8 ? 'met' : 'NOT met'})`);
    return { e2bMs: e2b, cliMs: cli, ratio, files: rows, writeShare, readShare };
  } finally {
    await d.stop();
    rmSync(work, { recursive: true, force: true });
  }
}

// BENCH_ONLY=expose|egress|images|accel|cli|cp|sdk|volumes|pool|idle|checkpoint|events|e2b|ui runs one section alone (a minute or two; the whole bench takes several).
if (
  ['expose', 'egress', 'images', 'accel', 'cli', 'cp', 'sdk', 'volumes', 'pool', 'idle', 'checkpoint', 'events', 'e2b', 'ui'].includes(
    process.env.BENCH_ONLY ?? '',
  )
) {
  const only = {
    expose: benchExpose,
    egress: benchEgress,
    images: benchImages,
    accel: benchAccel,
    cli: benchCli,
    cp: benchCp,
    pool: benchPool,
    sdk: benchSdk,
    volumes: benchVolumes,
    idle: benchIdle,
    checkpoint: benchCheckpoint,
    events: benchEvents,
    e2b: benchE2b,
    ui: benchUi,
  }[process.env.BENCH_ONLY];
  await only();
  process.exit(0);
}

const cold = await startDaemon(false);
const warm = await startDaemon(true);
const home = cold.home;
const env = cold.env;
const client = cold.client;
try {
  const status = await client.status();
  console.log(`aegis bench: ${RUNS} runs each, backend ${status.backend.name} (${status.backend.detail})`);
  console.log(`host: ${os.cpus().length} x ${os.cpus()[0]?.model ?? 'cpu'}, node ${process.version}\n`);

  // Interleave the two so drift in machine load hits both alike; one warm-up of each first.
  await rawBoot(home, 'warm');
  await aegisRun(env);
  const raw = [];
  const ours = [];
  for (let i = 0; i < RUNS; i++) {
    raw.push(await rawBoot(home, i));
    ours.push(await aegisRun(env));
  }
  // Warm: instances restored from the daemon's snapshot template (built in the background).
  for (let i = 0; i < 600 && !/template \w+: ready|warm boot/.test(warm.log()); i++) await new Promise((r) => setTimeout(r, 100));
  await aegisRun(warm.env);
  const warmRuns = [];
  for (let i = 0; i < RUNS; i++) warmRuns.push(await aegisRun(warm.env));
  if (!/warm boot/.test(warm.log())) throw new Error('the warm daemon never restored from a template');
  const rows = [
    ['raw QEMU boot (same kernel + rootfs, init=/bin/true)', raw],
    ['cold `aegis run -- true` (kernel boot, Node start)', ours],
    ['warm `aegis run -- true` (restored from a template)', warmRuns],
  ];
  for (const [name, xs] of rows) {
    console.log(`${name.padEnd(56)} median ${fmt(median(xs))}  (min ${fmt(Math.min(...xs))}, max ${fmt(Math.max(...xs))})`);
  }
  const ratio = median(ours) / median(raw);
  const warmRatio = median(warmRuns) / median(raw);
  console.log(`\nratio cold aegis run / raw boot: ${ratio.toFixed(2)}x   (target <= 1.20x: ${ratio <= 1.2 ? 'met' : 'NOT met'})`);
  console.log(`ratio warm aegis run / raw boot: ${warmRatio.toFixed(2)}x   (target <= 1.20x: ${warmRatio <= 1.2 ? 'met' : 'NOT met'})`);

  const EXECS = Number(process.env.BENCH_EXECS ?? 50);
  console.log(`\nexec round trip, ${EXECS} runs each:`);
  const direct = await directHarness(home, EXECS);
  await client.createInstance({ handle: 'bench-exec', command: ['sleep', '3600'] });
  for (let i = 0; i < 3; i++) await aegisExec(env, 'bench-exec');
  const cli = [];
  const api = [];
  for (let i = 0; i < EXECS; i++) {
    cli.push(await aegisExec(env, 'bench-exec'));
    api.push((await apiExec(client, 'bench-exec')).ms);
  }
  await client.deleteInstance('bench-exec', { force: true });
  const reference = median(direct.spawn) + median(direct.rtt);
  const ms = (x) => `${x.toFixed(1)} ms`;
  console.log(`${'harness: spawn `true` in the guest (its own measure)'.padEnd(56)} median ${ms(median(direct.spawn))}`);
  console.log(`${'agent channel round trip (health, no daemon)'.padEnd(56)} median ${ms(median(direct.rtt))}`);
  console.log(`${'reference = spawn + one round trip'.padEnd(56)}        ${ms(reference)}`);
  console.log(`${'`aegis exec <h> -- true` (CLI process)'.padEnd(56)} median ${ms(median(cli))}`);
  console.log(`${'exec `true` through the API client (no CLI start)'.padEnd(56)} median ${ms(median(api))}`);
  const execRatio = median(cli) / reference;
  console.log(
    `\nratio aegis exec / reference: ${execRatio.toFixed(2)}x (target <= 2.00x: ${execRatio <= 2 ? 'met' : 'NOT met'}); ` +
      `API client alone: ${(median(api) / reference).toFixed(2)}x`,
  );
  const accel = await benchAccel();
  const expose = await benchExpose();
  const egress = await benchEgress();
  const images = await benchImages();
  const cliStart = await benchCli();
  const cp = await benchCp();
  const sdk = await benchSdk();
  const volumes = await benchVolumes();
  const pool = await benchPool();
  const idle = await benchIdle();
  const checkpoint = await benchCheckpoint();
  const events = await benchEvents();
  const ui = await benchUi();
  const out = path.join(ROOT, 'bench/results');
  mkdirSync(out, { recursive: true });
  writeFileSync(
    path.join(out, `core-${new Date().toISOString().replaceAll(':', '-')}.json`),
    JSON.stringify(
      {
        runs: RUNS,
        rawBootMs: raw,
        aegisRunTrueMs: ours,
        ratio,
        exec: { cliMs: cli, apiMs: api, guestSpawnMs: direct.spawn, channelRttMs: direct.rtt, ratio: execRatio },
        accel,
        expose,
        egress,
        images,
        cli: cliStart,
        cp,
        sdk,
        volumes,
        pool,
        idle,
        checkpoint,
        events,
        ui,
        backend: status.backend,
      },
      null,
      2,
    ),
  );
} finally {
  await cold.stop();
  await warm.stop();
}
