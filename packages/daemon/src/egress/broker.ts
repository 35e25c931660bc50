/**
 * Secrets brokered, not handed over. A guest started with `--secret KEY` sees a placeholder
 * in its environment; when it sends that placeholder (in the URL or a header value of an HTTP
 * request) to a host the secret is bound to, the host puts the value in its place on the way
 * out. The value never enters the guest.
 *
 * For HTTPS, the host terminates the guest's TLS, but only for bound hosts: it answers with a
 * leaf certificate for the server name, signed by a per-instance CA that the guest trusts (the
 * CA key is derived from a seed, so it survives a daemon restart with nothing stored), and
 * makes its own HTTPS request upstream, verifying the upstream certificate against the host's
 * roots (plus AEGIS_EXTRA_CA_CERTS). That verification is what makes sending the value safe: the
 * guest chooses the address it dials, but only the real server name's holder can answer.
 *
 * Trust (docs/design.md, "Egress"): everything from the guest is untrusted: the request head is
 * bounded, names are compared with the rules' own matching, and a value is substituted only when
 * every name the request could be routed by (TLS server name, Host, an absolute-form URL's
 * authority) is bound to it, so `Host: attacker.example` on a connection to a bound name (domain
 * fronting on a shared CDN) gets no value. Plain HTTP has no certificate to check, so there the
 * value goes only to an address the bound name resolves to on the host, whatever the guest
 * dialled. No error, log line or response made here carries a value.
 */
import crypto, { webcrypto } from 'node:crypto';
import { promises as dnsp } from 'node:dns';
import fs from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import net from 'node:net';
import { Duplex } from 'node:stream';
import tls from 'node:tls';
import { AegisError } from '@aegis/protocol';
import { issueLeaf, leafKeyPair, loadCa, type InstanceCa, type LoadedCa } from './certificates.js';
import { nameMatches, parseRule, type Rule } from './rules.js';

export { instanceCa, type InstanceCa } from './certificates.js';

export interface BrokeredSecret {
  /** What the guest sees in its environment instead of the value, e.g. "aegis-secret-<48 hex>". */
  placeholder: string;
  value: string;
  /** Patterns of hosts the value may go to: a name ("api.example.com") or "*.suffix" (the suffix itself and its sub-names), with an optional ":PORT". */
  hosts: string[];
}

export interface SecretBrokerOptions {
  ca: InstanceCa;
  secrets: BrokeredSecret[];
  /** PEMs the upstream certificates are verified against; default: the host's roots plus the PEM file named by AEGIS_EXTRA_CA_CERTS. */
  upstreamCa?: string[];
  connectTimeoutMs?: number;
  /**
   * Where a name lives, for plain HTTP (no certificate proves who answers): a value is sent only
   * to one of these addresses. Default: the host's resolver. The egress pins (what the guest's
   * own DNS answers said) fit well: a CDN answering differently each time then still matches.
   */
  addressesOf?: (name: string) => Promise<string[]>;
}

/** Bounds per broker and per guest connection: what a guest can make the host hold or do. */
export const BROKER_LIMITS = {
  /** Request line and headers; beyond it the guest gets 431 (a malformed head: 400). */
  requestHeadBytes: 64 * 1024,
  /** Upstream requests in flight for one guest connection (pipelined requests wait their turn). */
  upstreamPerConnection: 4,
  /** Pipelined requests waiting behind those; one more closes the connection. */
  waitingPerConnection: 32,
  connectTimeoutMs: 10_000,
  /** Leaf certificates kept (a `*.suffix` binding lets the guest ask for any number of names). */
  leafCacheEntries: 256,
  leafValidityMs: 7 * 24 * 3600_000,
  /** A cached leaf is made again once it is this old, well before it expires. */
  leafRenewMs: 2 * 24 * 3600_000,
  /** Answers of `addressesOf` kept per name. */
  addressCacheMs: 30_000,
  addressCacheEntries: 256,
  /** Upstream connections kept open between requests (per broker and destination). */
  upstreamSockets: 16,
  upstreamFreeSocketMs: 4_000,
} as const;

/** The placeholder for secret `name` (HMAC-SHA256 under `seed`): stable for a seed, unguessable without it. */
export function placeholderFor(seed: Buffer, name: string): string {
  return `aegis-secret-${crypto.createHmac('sha256', seed).update(name, 'utf8').digest('hex').slice(0, 48)}`;
}

interface Secret extends BrokeredSecret {
  rules: Rule[];
}

/** What the broker knows of one guest connection (keyed by the socket the HTTP server sees). */
interface ConnState {
  tls: boolean;
  serverName: string;
  dest: { address: string; port: number };
  active: number;
  waiting: Array<() => void>;
}

/** Header value characters HTTP allows (what Node's own check accepts). */
const HEADER_VALUE_RE = /^[\t\x20-\x7e\x80-\xff]*$/;
/** Hop-by-hop headers: about the guest's connection to us, or ours to upstream, not the request. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'upgrade', 'te', 'trailer', 'expect']);

export class SecretBroker {
  private readonly secrets: Secret[];
  private readonly ca: Promise<LoadedCa>;
  private leafKeys: Promise<{ keys: webcrypto.CryptoKeyPair; keyPem: string }> | undefined;
  private readonly leaves = new Map<string, { context: Promise<tls.SecureContext>; madeMs: number }>();
  private readonly upstreamContext: tls.SecureContext;
  private readonly connectTimeoutMs: number;
  private readonly addressesOf: (name: string) => Promise<string[]>;
  private readonly addressCache = new Map<string, { addresses: Promise<string[]>; untilMs: number }>();
  private readonly httpsAgent: https.Agent;
  private readonly httpAgent: http.Agent;
  private readonly server: http.Server;
  private readonly conns = new WeakMap<object, ConnState>();
  private readonly open = new Set<Duplex>();
  private closed = false;

  constructor(options: SecretBrokerOptions) {
    this.secrets = options.secrets.map((s) => checkSecret(s));
    this.connectTimeoutMs = options.connectTimeoutMs ?? BROKER_LIMITS.connectTimeoutMs;
    this.addressesOf = options.addressesOf ?? ((name) => dnsp.lookup(name, { all: true }).then((list) => list.map((a) => a.address)));
    const ca = options.upstreamCa ?? defaultUpstreamCa();
    try {
      this.upstreamContext = tls.createSecureContext({ ca });
    } catch (err) {
      throw new AegisError('INVALID_ARGUMENT', `the upstream CA certificates are not valid PEM (${(err as Error).message})`);
    }
    this.ca = loadCa(options.ca);
    // A bad CA would otherwise surface only as refused handshakes; keep it from being unhandled too.
    this.ca.catch(() => {});
    const agentOptions = {
      keepAlive: true,
      maxSockets: BROKER_LIMITS.upstreamSockets,
      maxFreeSockets: 4,
      timeout: BROKER_LIMITS.upstreamFreeSocketMs,
    };
    this.httpsAgent = new https.Agent(agentOptions);
    this.httpAgent = new http.Agent(agentOptions);
    this.server = http.createServer({ maxHeaderSize: BROKER_LIMITS.requestHeadBytes }, (req, res) => this.onRequest(req, res));
    // The server never listens: guest connections are handed to it one by one.
  }

  /** Whether a connection asking for `name` (TLS server name or HTTP Host), on `port` if given, is one to broker. */
  brokers(name: string, port?: number): boolean {
    return this.secrets.some((s) => s.rules.some((r) => nameMatches(r, name, port)));
  }

  /**
   * Takes over one guest connection that the policy allowed and `brokers` chose: `guest`
   * carries the guest's bytes, `dest` is where it dialled, `head` the bytes already read from it
   * (replayed first), `serverName` the TLS server name or HTTP Host they asked for. TLS (head
   * starts with a handshake record) is terminated with a leaf for `serverName`, then both kinds
   * are served as HTTP/1.1, each request forwarded upstream on its own.
   */
  handle(guest: Duplex, dest: { address: string; port: number }, head: Buffer, serverName: string): void {
    if (this.closed) {
      guest.destroy();
      return;
    }
    const stream = withHead(guest, head);
    this.open.add(stream);
    stream.once('close', () => this.open.delete(stream));
    stream.on('error', () => stream.destroy());
    const name = serverName.toLowerCase().replace(/\.$/, '');
    const state: ConnState = { tls: head[0] === 0x16, serverName: name, dest, active: 0, waiting: [] };
    if (!state.tls) {
      this.conns.set(stream, state);
      this.server.emit('connection', stream);
      return;
    }
    this.leafContext(name).then(
      (secureContext) => {
        if (stream.destroyed) return;
        const socket = new tls.TLSSocket(stream, { isServer: true, secureContext, ALPNProtocols: ['http/1.1'] });
        socket.on('error', () => socket.destroy());
        this.conns.set(socket, state);
        this.server.emit('connection', socket);
      },
      () => stream.destroy(),
    );
  }

  /** Ends every connection being brokered and the upstream connections kept open (the instance stopped). */
  close(): void {
    this.closed = true;
    for (const s of this.open) s.destroy();
    this.open.clear();
    this.httpsAgent.destroy();
    this.httpAgent.destroy();
  }

  // ---- certificates -------------------------------------------------------------------------

  private leafContext(name: string): Promise<tls.SecureContext> {
    const now = Date.now();
    const cached = this.leaves.get(name);
    if (cached && now - cached.madeMs < BROKER_LIMITS.leafRenewMs) return cached.context;
    this.leaves.delete(name);
    if (this.leaves.size >= BROKER_LIMITS.leafCacheEntries) this.leaves.delete(this.leaves.keys().next().value as string);
    const context = this.makeLeaf(name, now);
    this.leaves.set(name, { context, madeMs: now });
    context.catch(() => this.leaves.delete(name));
    return context;
  }

  private async makeLeaf(name: string, now: number): Promise<tls.SecureContext> {
    // One key for every leaf of this broker: a certificate per name is cheap, a key pair less so.
    this.leafKeys ??= (async () => {
      const keys = await leafKeyPair();
      const der = Buffer.from(await webcrypto.subtle.exportKey('pkcs8', keys.privateKey));
      const keyPem = crypto.createPrivateKey({ key: der, format: 'der', type: 'pkcs8' }).export({ type: 'pkcs8', format: 'pem' }) as string;
      return { keys, keyPem };
    })();
    const [{ keys, keyPem }, ca] = await Promise.all([this.leafKeys, this.ca]);
    const cert = await issueLeaf(ca, keys.publicKey, name, now, BROKER_LIMITS.leafValidityMs);
    return tls.createSecureContext({ key: keyPem, cert });
  }

  // ---- requests -----------------------------------------------------------------------------

  private onRequest(req: http.IncomingMessage, res: http.ServerResponse): void {
    const state = this.conns.get(req.socket);
    if (!state) {
      res.destroy();
      return;
    }
    const run = (): void => {
      if (req.socket.destroyed) return next();
      state.active++;
      this.forward(req, res, state)
        .catch(() => res.destroy())
        .finally(() => {
          state.active--;
          next();
        });
    };
    const next = (): void => state.waiting.shift()?.();
    if (state.active < BROKER_LIMITS.upstreamPerConnection) run();
    else if (state.waiting.length < BROKER_LIMITS.waitingPerConnection) state.waiting.push(run);
    else req.socket.destroy();
  }

  /** The secrets this request may carry: those bound to every name it could be routed by. */
  private applicable(req: http.IncomingMessage, state: ConnState): { secrets: Secret[]; names: string[] } {
    const names: string[] = [];
    if (state.tls) names.push(state.serverName);
    const host = req.headers.host;
    if (host !== undefined) names.push(hostOf(host));
    const absolute = /^[a-z][a-z0-9+.-]*:\/\/([^/?#]*)/i.exec(req.url ?? '')?.[1];
    if (absolute !== undefined) names.push(hostOf(absolute.slice(absolute.lastIndexOf('@') + 1)));
    if (names.length === 0) return { secrets: [], names };
    const port = state.dest.port;
    return { secrets: this.secrets.filter((s) => names.every((n) => s.rules.some((r) => nameMatches(r, n, port)))), names };
  }

  private async forward(req: http.IncomingMessage, res: http.ServerResponse, state: ConnState): Promise<void> {
    const found = this.applicable(req, state);
    const names = found.names;
    let secrets = found.secrets;
    let address = state.dest.address;
    if (!state.tls && secrets.length > 0) {
      // No certificate on plain HTTP: the value goes only where the bound name lives.
      const where = await this.whereAll(names);
      if (where === undefined) secrets = [];
      else if (!where.includes(address)) address = where[0] as string;
    }
    const used = new Set<Secret>();
    const substitute = (text: string, inUrl: boolean): string => {
      let out = text;
      for (const s of secrets) {
        if (!out.includes(s.placeholder)) continue;
        out = out.split(s.placeholder).join(inUrl ? encodeURIComponent(s.value) : s.value);
        used.add(s);
      }
      return out;
    };
    const path = substitute(req.url ?? '/', true);
    const headers = copyHeaders(req.rawHeaders, (v) => substitute(v, false));
    const upstreamName = state.tls ? state.serverName : (names[0] ?? address);

    return new Promise<void>((resolve) => {
      res.once('close', () => resolve());
      let up: http.ClientRequest;
      try {
        const common = { host: address, port: state.dest.port, method: req.method, path, headers, setHost: false };
        up = state.tls
          ? https.request({
              ...common,
              agent: this.httpsAgent,
              servername: state.serverName,
              // tls.connect takes it; https.RequestOptions does not list it.
              ...({ secureContext: this.upstreamContext } as https.RequestOptions),
            })
          : http.request({ ...common, agent: this.httpAgent });
      } catch (err) {
        // Node refuses a path or header it cannot send; its message names the header, never the value.
        fail(res, 400, `aegis: the request cannot be sent upstream (${(err as NodeJS.ErrnoException).code ?? 'invalid'})`);
        req.resume();
        return;
      }
      let timer: NodeJS.Timeout | undefined;
      up.once('socket', (socket: net.Socket) => {
        // Connecting covers the TLS handshake too: a server that accepts and says nothing is as
        // unreachable as one that never answers. A kept-alive connection is ready already.
        const ready = state.tls ? (socket as tls.TLSSocket).authorized : !socket.connecting;
        if (ready) return;
        timer = setTimeout(
          () => up.destroy(Object.assign(new Error('connect timeout'), { code: 'AEGIS_CONNECT_TIMEOUT' })),
          this.connectTimeoutMs,
        );
        socket.once(state.tls ? 'secureConnect' : 'connect', () => clearTimeout(timer));
      });
      up.once('response', (upRes) => {
        clearTimeout(timer);
        // A value in a response header (a redirect that repeats the query) goes back as its placeholder.
        const scrub = (v: string): string => {
          let out = v;
          for (const s of used) out = out.split(s.value).join(s.placeholder).split(encodeURIComponent(s.value)).join(s.placeholder);
          return out;
        };
        if (res.destroyed) {
          upRes.resume();
          return;
        }
        try {
          res.writeHead(upRes.statusCode ?? 502, upRes.statusMessage, copyHeaders(upRes.rawHeaders, scrub));
        } catch {
          // Upstream is not trusted to be well-formed either: a head Node will not send ends the exchange.
          upRes.resume();
          res.destroy();
          return;
        }
        upRes.pipe(res);
        upRes.on('error', () => res.destroy());
        upRes.on('aborted', () => res.destroy());
      });
      up.on('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        req.unpipe(up);
        req.resume();
        if (res.headersSent || res.destroyed) {
          res.destroy();
          return;
        }
        const [status, why] = upstreamFailure(err, upstreamName, address, state.dest.port, this.connectTimeoutMs);
        fail(res, status, `aegis: ${why}`);
      });
      res.once('close', () => {
        if (!res.writableFinished) up.destroy();
      });
      req.pipe(up);
    });
  }

  /** Addresses every one of `names` resolves to (the first name's), or undefined if any has none. */
  private async whereAll(names: string[]): Promise<string[] | undefined> {
    let common: string[] | undefined;
    for (const n of names) {
      const list = await this.lookup(n);
      common = common === undefined ? list : common.filter((a) => list.includes(a));
    }
    return common !== undefined && common.length > 0 ? common : undefined;
  }

  private lookup(name: string): Promise<string[]> {
    const now = Date.now();
    const cached = this.addressCache.get(name);
    if (cached && cached.untilMs > now) return cached.addresses;
    this.addressCache.delete(name);
    if (this.addressCache.size >= BROKER_LIMITS.addressCacheEntries)
      this.addressCache.delete(this.addressCache.keys().next().value as string);
    const addresses = this.addressesOf(name).then(
      (list) => list.filter((a) => net.isIP(a) !== 0),
      () => [] as string[],
    );
    this.addressCache.set(name, { addresses, untilMs: now + BROKER_LIMITS.addressCacheMs });
    return addresses;
  }
}

function checkSecret(s: BrokeredSecret): Secret {
  if (typeof s.placeholder !== 'string' || s.placeholder.length < 16)
    throw new AegisError('INVALID_ARGUMENT', 'a brokered secret needs a placeholder of at least 16 characters (placeholderFor makes one)');
  const which = `brokered secret ${s.placeholder}`;
  if (typeof s.value !== 'string' || s.value.length === 0) throw new AegisError('INVALID_ARGUMENT', `${which}: its value is empty`);
  if (!HEADER_VALUE_RE.test(s.value))
    throw new AegisError(
      'INVALID_ARGUMENT',
      `${which}: its value has characters an HTTP header cannot carry (control characters or beyond Latin-1); store it encoded`,
    );
  if (!Array.isArray(s.hosts) || s.hosts.length === 0)
    throw new AegisError('INVALID_ARGUMENT', `${which}: no host is bound to it (--host api.example.com)`);
  const rules = s.hosts.map((h) => {
    const rule = parseRule(h);
    if (rule.target.kind === 'address')
      throw new AegisError('INVALID_ARGUMENT', `${which}: host ${JSON.stringify(h)} is an address; bind a name (a certificate names it)`);
    return rule;
  });
  return { placeholder: s.placeholder, value: s.value, hosts: [...s.hosts], rules };
}

/** The host's roots and, if AEGIS_EXTRA_CA_CERTS names a PEM file, its certificates. */
function defaultUpstreamCa(): string[] {
  const extra = process.env.AEGIS_EXTRA_CA_CERTS;
  if (!extra) return [...tls.rootCertificates];
  try {
    return [...tls.rootCertificates, fs.readFileSync(extra, 'utf8')];
  } catch (err) {
    throw new AegisError(
      'FAILED_PRECONDITION',
      `AEGIS_EXTRA_CA_CERTS names ${extra}, which cannot be read (${(err as NodeJS.ErrnoException).code ?? 'error'}): fix the path or unset it`,
    );
  }
}

/** `name[:port]` or `[v6]:port` → the name, lowercased, without the port or a trailing dot. */
function hostOf(authority: string): string {
  const h = authority.trim().toLowerCase();
  if (h.startsWith('[')) return h.slice(1, h.indexOf(']') > 0 ? h.indexOf(']') : undefined);
  const i = h.lastIndexOf(':');
  const name = i >= 0 && h.indexOf(':') === i ? h.slice(0, i) : h;
  return name.replace(/\.$/, '');
}

/** Raw headers (name, value, name, value...) without hop-by-hop ones, each value through `map`. */
function copyHeaders(raw: string[], map: (value: string) => string): string[] {
  const dropped = new Set(HOP_BY_HOP);
  for (let i = 0; i + 1 < raw.length; i += 2)
    if ((raw[i] as string).toLowerCase() === 'connection')
      for (const token of (raw[i + 1] as string).split(',')) dropped.add(token.trim().toLowerCase());
  const out: string[] = [];
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i] as string;
    if (dropped.has(name.toLowerCase())) continue;
    out.push(name, map(raw[i + 1] as string));
  }
  return out;
}

/** The status and one line for an upstream that failed before answering: codes and names only. */
function upstreamFailure(err: NodeJS.ErrnoException, name: string, address: string, port: number, timeoutMs: number): [number, string] {
  const code = err.code ?? 'error';
  if (code === 'AEGIS_CONNECT_TIMEOUT') return [504, `no connection to ${name} (${address}:${port}) within ${timeoutMs / 1000} s`];
  if (code === 'ERR_TLS_CERT_ALTNAME_INVALID') return [502, `the certificate of ${address}:${port} is not for ${name}`];
  if (/CERT|SELF_SIGNED|UNABLE_TO_|VERIFY/.test(code)) return [502, `the certificate of ${name} did not verify (${code})`];
  return [502, `${name} (${address}:${port}) failed: ${code}`];
}

function fail(res: http.ServerResponse, status: number, text: string): void {
  const body = `${text}\n`;
  res.writeHead(status, {
    'content-type': 'text/plain; charset=utf-8',
    'content-length': Buffer.byteLength(body),
    // The request body may be left unread: a fresh connection is simpler than draining it.
    connection: 'close',
  });
  res.end(body);
}

/** `guest` as a Duplex that yields `head` before anything else the guest sends. */
function withHead(guest: Duplex, head: Buffer): Duplex {
  let pending: Buffer | undefined = head.length > 0 ? head : undefined;
  const out = new Duplex({
    read() {
      if (pending) {
        const h = pending;
        pending = undefined;
        if (!this.push(h)) return;
      }
      guest.resume();
    },
    write(chunk: Buffer, _enc, cb) {
      if (guest.destroyed || guest.writableEnded) return cb(new Error('the guest connection is closed'));
      if (guest.write(chunk)) cb();
      else guest.once('drain', () => cb());
    },
    final(cb) {
      guest.end();
      cb();
    },
    destroy(err, cb) {
      // Like a socket closed after its last write (the HTTP server's 431 and 400 answers): what
      // was written still reaches the guest, then the connection ends. An error resets it.
      if (err || !guest.writable) guest.destroy();
      else guest.end(() => guest.destroy());
      cb(err);
    },
  });
  guest.pause();
  guest.on('data', (chunk: Buffer) => {
    if (!out.push(chunk)) guest.pause();
  });
  guest.once('end', () => out.push(null));
  guest.once('error', (err) => out.destroy(err));
  guest.once('close', () => {
    // A clean end reached `out` as EOF already; anything else ends it too.
    if (!guest.readableEnded && !out.destroyed) out.destroy();
  });
  return out;
}
