/**
 * What every loopback TCP door of aegisd (the E2B endpoint, the dashboard) shares. A TCP port
 * is open to every local user and to every web page the user's browser shows (the unix socket
 * is 0600 and no browser reaches it), so each door checks, before anything else: the address
 * it listens on is loopback; `Host` names that address (DNS rebinding: a foreign name resolving
 * to 127.0.0.1 still carries its own name); `Origin`, when a browser sends one, is loopback too
 * (a page elsewhere must not drive it); and a secret from a 0600 file in `$AEGIS_HOME`.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';

export interface LoopbackAddr {
  host: string;
  port: number;
}

/** `HOST:PORT` on loopback (port 0: any free one), for the door named `what` (in messages). */
export function parseLoopbackAddr(addr: string, what: string): LoopbackAddr {
  const m = /^(\[[0-9a-fA-F:]+\]|[^:]+):(\d{1,5})$/.exec(addr.trim());
  if (!m) throw new AegisError('INVALID_ARGUMENT', `${what} address must be HOST:PORT on loopback (e.g. 127.0.0.1:3000), not "${addr}"`);
  const host = (m[1] ?? '').replace(/^\[|\]$/g, '');
  const port = Number(m[2]);
  if (port > 65535) throw new AegisError('INVALID_ARGUMENT', `port ${port} is out of range`);
  if (!(host === 'localhost' || host === '::1' || /^127(\.\d{1,3}){3}$/.test(host))) {
    throw new AegisError('INVALID_ARGUMENT', `the ${what} listens on loopback only (127.0.0.1 or ::1), not ${host}`);
  }
  return { host: host === 'localhost' ? '127.0.0.1' : host, port };
}

export interface OriginRules {
  /** Names under `.localhost` count as ours (E2B's getHost: `<port>-<id>.localhost`). */
  subdomains: boolean;
  /**
   * An Origin must name our port exactly (the dashboard: its pages come from it alone). Without
   * this an Origin with no port (`http://localhost`) passes, as E2B's SDKs in a browser send.
   */
  exactOrigin: boolean;
}

const E2B_RULES: OriginRules = { subdomains: true, exactOrigin: false };

/**
 * DNS rebinding and cross-site requests: a browser page must not drive the door. A request
 * passes when its Host names loopback (or our own address) and it has no Origin, or an Origin
 * on loopback. Throws PERMISSION_DENIED otherwise.
 */
export function checkHostAndOrigin(
  host: string | undefined,
  origin: string | undefined,
  ours: LoopbackAddr,
  rules: OriginRules = E2B_RULES,
): void {
  if (host === undefined || !loopbackHost(host, ours, rules.subdomains)) {
    throw new AegisError(
      'PERMISSION_DENIED',
      `Host ${JSON.stringify(host ?? '')} is not this endpoint's loopback address: refused (DNS rebinding)`,
    );
  }
  if (origin !== undefined && origin !== '' && origin !== 'null') {
    let parsed: URL | undefined;
    try {
      parsed = new URL(origin);
    } catch {
      parsed = undefined;
    }
    const ok =
      parsed !== undefined &&
      loopbackHost(parsed.host, ours, rules.subdomains) &&
      (!rules.exactOrigin || (parsed.protocol === 'http:' && Number(parsed.port) === ours.port));
    if (!ok) throw new AegisError('PERMISSION_DENIED', `requests from web origin ${JSON.stringify(origin)} are refused`);
  } else if (origin === 'null') {
    throw new AegisError('PERMISSION_DENIED', 'requests from an opaque web origin are refused');
  }
}

/** `host[:port]` names loopback or our address (with `subdomains`, a name under `.localhost` counts). */
export function loopbackHost(hostHeader: string, ours: LoopbackAddr, subdomains = true): boolean {
  const m = /^(\[[0-9a-fA-F:.]+\]|[^:]+)(?::(\d+))?$/.exec(hostHeader.trim());
  if (!m) return false;
  const name = (m[1] ?? '').toLowerCase().replace(/^\[|\]$/g, '');
  if (m[2] !== undefined && Number(m[2]) !== ours.port) return false;
  return (
    name === 'localhost' ||
    (subdomains && name.endsWith('.localhost')) ||
    name === ours.host ||
    /^127(\.\d{1,3}){3}$/.test(name) ||
    name === '::1'
  );
}

/** Constant-time equality of two secrets (their lengths may differ). */
export function sameSecret(a: string, b: string): boolean {
  const x = Buffer.from(a);
  const y = Buffer.from(b);
  return x.length === y.length && timingSafeEqual(x, y);
}

/** Replaces `$home/name` with `value` atomically, 0600 from its first byte. */
export async function writeSecretFile(home: string, name: string, value: string): Promise<string> {
  const file = path.join(home, name);
  const temp = `${file}.${randomBytes(4).toString('hex')}`;
  await fs.writeFile(temp, `${value}\n`, { mode: 0o600, flag: 'wx' });
  await fs.rename(temp, file);
  return value;
}

/** The secret in `$home/name` when it has the right form, else a new one (`make()`) written there. */
export async function ensureSecretFile(home: string, name: string, valid: RegExp, make: () => string): Promise<string> {
  const existing = await fs.readFile(path.join(home, name), 'utf8').catch(() => undefined);
  if (existing !== undefined && valid.test(existing.trim())) return existing.trim();
  return writeSecretFile(home, name, make());
}
