/**
 * A real OCI registry for tests: Debian's `docker-registry` (the reference distribution, 2.8) on a
 * loopback port with filesystem storage in a temp dir, optionally behind token auth served from
 * this process. Plus helpers to build a small synthetic OCI image layout and push it with skopeo.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, createPrivateKey, createPublicKey, randomUUID, sign, type KeyObject } from 'node:crypto';
import { promises as fs } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { gzipSync } from 'node:zlib';
import * as tar from 'tar-stream';

const execFileP = promisify(execFile);

export interface TestRegistry {
  /** `127.0.0.1:<port>`: loopback, so clients use plain http. */
  host: string;
  /** The registry's filesystem storage root (blobs live under docker/registry/v2/blobs/sha256/). */
  storageDir: string;
  /** Everything the registry process printed, including its access log. */
  log(): Promise<string>;
  stop(): Promise<void>;
}

export interface Credentials {
  user: string;
  password: string;
}

export async function startRegistry(options: { tokenAuth?: Credentials } = {}): Promise<TestRegistry> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'aegis-test-registry-'));
  const storageDir = path.join(dir, 'storage');
  const logFile = path.join(dir, 'registry.log');
  await fs.mkdir(storageDir);
  const port = await freePort();
  const host = `127.0.0.1:${port}`;
  let tokenServer: TokenServer | undefined;
  let proc: ChildProcess | undefined;

  const stop = async (): Promise<void> => {
    if (proc && proc.exitCode === null && proc.signalCode === null) {
      const exited = new Promise((resolve) => proc?.once('exit', resolve));
      proc.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
    }
    await tokenServer?.close();
    await fs.rm(dir, { recursive: true, force: true });
  };

  try {
    let auth = '';
    if (options.tokenAuth) {
      tokenServer = await startTokenServer(dir, options.tokenAuth);
      auth = [
        'auth:',
        '  token:',
        `    realm: ${tokenServer.realm}`,
        `    service: ${TOKEN_SERVICE}`,
        `    issuer: ${TOKEN_ISSUER}`,
        `    rootcertbundle: ${tokenServer.certFile}`,
      ].join('\n');
    }
    const config = [
      'version: 0.1',
      'log:',
      '  level: info',
      '  formatter: text',
      'storage:',
      '  filesystem:',
      `    rootdirectory: ${storageDir}`,
      '  delete:',
      '    enabled: true',
      'http:',
      `  addr: ${host}`,
      `  secret: ${randomUUID()}`,
      auth,
      '',
    ].join('\n');
    const configFile = path.join(dir, 'config.yml');
    await fs.writeFile(configFile, config);
    const log = await fs.open(logFile, 'a');
    proc = spawn('/usr/bin/docker-registry', ['serve', configFile], { stdio: ['ignore', log.fd, log.fd] });
    await log.close();
    await waitUntilServing(host, proc, logFile);
  } catch (err) {
    const log = await fs.readFile(logFile, 'utf8').catch(() => '');
    await stop();
    throw new Error(`docker-registry did not start: ${(err as Error).message}\n${log}`);
  }
  return { host, storageDir, stop, log: () => fs.readFile(logFile, 'utf8') };
}

/**
 * Copies an OCI layout (the only image in it, or the one tagged `sourceTag`) to
 * `docker://<ref>`, e.g. `127.0.0.1:5000/team/tools:1.2`.
 */
export async function pushOciLayout(dir: string, ref: string, creds?: Credentials, sourceTag?: string): Promise<void> {
  const args = ['copy', '--insecure-policy', '--quiet', '--dest-tls-verify=false'];
  if (creds) args.push('--dest-creds', `${creds.user}:${creds.password}`);
  args.push(sourceTag ? `oci:${dir}:${sourceTag}` : `oci:${dir}`, `docker://${ref}`);
  await execFileP('skopeo', args, { timeout: 120_000 });
}

export interface LayerFile {
  name: string;
  data: Buffer | string;
}

export interface BuiltImage {
  manifestDigest: string;
  configDigest: string;
  /** Compressed (distribution) digests, in order. */
  layerDigests: string[];
  /** Uncompressed digests, as the config's rootfs.diff_ids lists them. */
  diffIds: string[];
}

/**
 * Writes an OCI image layout holding one linux image whose layers are gzip tars of `layers`
 * (default: two small layers). `tag` becomes the index entry's `org.opencontainers.image.ref.name`.
 */
export async function buildOciLayout(
  dir: string,
  options: { tag?: string; layers?: LayerFile[][]; architecture?: string; cmd?: string[] } = {},
): Promise<BuiltImage> {
  const layers = options.layers ?? [
    [{ name: 'etc/greeting', data: 'hello from layer one\n' }],
    [
      { name: 'usr/bin/tool', data: '#!/bin/sh\necho tool\n' },
      { name: 'etc/greeting', data: 'hello from layer two\n' },
    ],
  ];
  await fs.mkdir(path.join(dir, 'blobs', 'sha256'), { recursive: true });
  const writeBlob = async (bytes: Buffer): Promise<string> => {
    const digest = sha256(bytes);
    await fs.writeFile(path.join(dir, 'blobs', 'sha256', digest.slice(7)), bytes);
    return digest;
  };

  const diffIds: string[] = [];
  const descriptors: { mediaType: string; digest: string; size: number }[] = [];
  for (const files of layers) {
    const plain = await tarOf(files);
    const gz = gzipSync(plain);
    diffIds.push(sha256(plain));
    descriptors.push({ mediaType: 'application/vnd.oci.image.layer.v1.tar+gzip', digest: await writeBlob(gz), size: gz.length });
  }
  const config = Buffer.from(
    JSON.stringify({
      created: '2024-01-01T00:00:00Z',
      architecture: options.architecture ?? 'amd64',
      os: 'linux',
      config: { Env: ['PATH=/usr/local/bin:/usr/bin:/bin', 'GREETING=hi'], Cmd: options.cmd ?? ['/usr/bin/tool'], WorkingDir: '/srv' },
      rootfs: { type: 'layers', diff_ids: diffIds },
      history: layers.map(() => ({ created: '2024-01-01T00:00:00Z', created_by: 'aegis test' })),
    }),
  );
  const configDigest = await writeBlob(config);
  const manifest = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: 'application/vnd.oci.image.manifest.v1+json',
      config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: configDigest, size: config.length },
      layers: descriptors,
    }),
  );
  const manifestDigest = await writeBlob(manifest);
  const entry: Record<string, unknown> = {
    mediaType: 'application/vnd.oci.image.manifest.v1+json',
    digest: manifestDigest,
    size: manifest.length,
  };
  if (options.tag) entry['annotations'] = { 'org.opencontainers.image.ref.name': options.tag };
  await fs.writeFile(path.join(dir, 'oci-layout'), JSON.stringify({ imageLayoutVersion: '1.0.0' }));
  await fs.writeFile(path.join(dir, 'index.json'), JSON.stringify({ schemaVersion: 2, manifests: [entry] }));
  return { manifestDigest, configDigest, layerDigests: descriptors.map((d) => d.digest), diffIds };
}

/** Where the registry keeps a blob's bytes (overwrite it to simulate corrupt storage). */
export function registryBlobPath(registry: Pick<TestRegistry, 'storageDir'>, digest: string): string {
  const hex = digest.slice('sha256:'.length);
  return path.join(registry.storageDir, 'docker/registry/v2/blobs/sha256', hex.slice(0, 2), hex, 'data');
}

function sha256(bytes: Buffer): string {
  return `sha256:${createHash('sha256').update(bytes).digest('hex')}`;
}

async function tarOf(files: LayerFile[]): Promise<Buffer> {
  const pack = tar.pack();
  for (const f of files)
    pack.entry({ name: f.name, mode: 0o755, mtime: new Date(0) }, typeof f.data === 'string' ? Buffer.from(f.data) : f.data);
  pack.finalize();
  const chunks: Buffer[] = [];
  for await (const c of pack as AsyncIterable<Buffer>) chunks.push(c);
  return Buffer.concat(chunks);
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}

async function waitUntilServing(host: string, proc: ChildProcess, logFile: string): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`exited with code ${proc.exitCode}`);
    try {
      const res = await fetch(`http://${host}/v2/`);
      await res.body?.cancel();
      if (res.status === 200 || res.status === 401) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`not serving on ${host} after 15s (log: ${logFile})`);
}

// ---- token auth --------------------------------------------------------------------------------

const TOKEN_SERVICE = 'aegis-test-registry';
const TOKEN_ISSUER = 'aegis-test-token-issuer';

interface TokenServer {
  realm: string;
  certFile: string;
  close(): Promise<void>;
}

/**
 * Issues RS256 JWTs the way the registry's token auth expects them. Correct credentials get every
 * action they ask for; no credentials get a token granting nothing (so the registry answers 401
 * insufficient_scope); wrong credentials get 401 from here.
 */
async function startTokenServer(dir: string, creds: Credentials): Promise<TokenServer> {
  const keyFile = path.join(dir, 'token-key.pem');
  const certFile = path.join(dir, 'token-cert.pem');
  await execFileP(
    'openssl',
    ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', keyFile, '-out', certFile, '-days', '2', '-subj', '/CN=aegis-test-token'],
    { timeout: 60_000 },
  );
  const key = createPrivateKey(await fs.readFile(keyFile));
  const kid = libtrustKeyId(createPublicKey(key));
  const expected = `Basic ${Buffer.from(`${creds.user}:${creds.password}`).toString('base64')}`;

  const server = http.createServer((req, res) => {
    const url = new URL(req.url ?? '/', 'http://token');
    if (url.pathname !== '/token') return void res.writeHead(404).end();
    const authorization = req.headers.authorization;
    if (authorization !== undefined && authorization !== expected) {
      res.writeHead(401, { 'content-type': 'application/json' });
      return void res.end(JSON.stringify({ details: 'invalid credentials' }));
    }
    const access = authorization === undefined ? [] : url.searchParams.getAll('scope').flatMap(parseScope);
    const now = Math.floor(Date.now() / 1000);
    const claims = {
      iss: TOKEN_ISSUER,
      sub: authorization === undefined ? '' : creds.user,
      aud: url.searchParams.get('service') ?? TOKEN_SERVICE,
      exp: now + 300,
      nbf: now - 60,
      iat: now,
      jti: randomUUID(),
      access,
    };
    const token = jwt({ alg: 'RS256', typ: 'JWT', kid }, claims, key);
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ token, access_token: token, expires_in: 300, issued_at: new Date().toISOString() }));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  return {
    realm: `http://127.0.0.1:${port}/token`,
    certFile,
    close: async () => {
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** `repository:team/tools:pull,push` → one access entry; several scopes may be space-separated. */
function parseScope(scope: string): { type: string; name: string; actions: string[] }[] {
  return scope
    .split(' ')
    .filter(Boolean)
    .flatMap((s) => {
      const first = s.indexOf(':');
      const last = s.lastIndexOf(':');
      if (first === -1 || last === first) return [];
      return [{ type: s.slice(0, first), name: s.slice(first + 1, last), actions: s.slice(last + 1).split(',') }];
    });
}

function jwt(header: object, claims: object, key: KeyObject): string {
  const b64 = (v: object): string => Buffer.from(JSON.stringify(v)).toString('base64url');
  const input = `${b64(header)}.${b64(claims)}`;
  return `${input}.${sign('sha256', Buffer.from(input), key).toString('base64url')}`;
}

/**
 * The registry finds a token's signing key among its trusted certificates by libtrust key ID:
 * the first 240 bits of the SHA-256 of the DER public key, base32, in colon-separated groups of 4.
 */
function libtrustKeyId(publicKey: KeyObject): string {
  const der = publicKey.export({ type: 'spki', format: 'der' });
  const encoded = base32(createHash('sha256').update(der).digest().subarray(0, 30));
  return encoded.match(/.{1,4}/g)?.join(':') ?? encoded;
}

function base32(bytes: Buffer): string {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  let bits = 0;
  let value = 0;
  let out = '';
  for (const byte of bytes) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += alphabet[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
  return out;
}
