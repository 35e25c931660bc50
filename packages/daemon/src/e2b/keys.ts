/**
 * The E2B endpoint's credentials. A TCP port is open to every local user (the unix socket is
 * 0600), so every request carries the API key (`X-API-Key`, REST) or a sandbox's access token
 * (`X-Access-Token`, envd calls). The key lives in `$AEGIS_HOME/e2b.key` (0600), made on first
 * use; `aegis e2b key --rotate` replaces the file and aegisd picks the new key up at the next
 * request (it looks at the file's mtime). Access tokens are derived from the key and the
 * sandbox id (HMAC), so nothing else is stored and a rotation revokes them all.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { statSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import { ensureSecretFile, sameSecret as same, writeSecretFile } from '../http/loopback.js';

// Shared with the dashboard since issue 24 (src/http/loopback.ts); still exported from here.
export { checkHostAndOrigin, loopbackHost } from '../http/loopback.js';

export const KEY_FILE = 'e2b.key';
/** Where a serving aegisd writes its E2B address, for `aegis e2b env`. */
export const ADDR_FILE = 'e2b.addr';

/** A new key in E2B's own shape (`e2b_` + 40 hex digits): SDKs that look at its form accept it. */
export function newKey(): string {
  return `e2b_${randomBytes(20).toString('hex')}`;
}

/** The key in `home`, made (0600) when there is none. */
export async function ensureKey(home: string): Promise<string> {
  return ensureSecretFile(home, KEY_FILE, /^e2b_[0-9a-f]{40}$/, newKey);
}

/** Replaces the key (atomically, 0600). */
export async function writeKey(home: string, key: string): Promise<string> {
  return writeSecretFile(home, KEY_FILE, key);
}

/**
 * envd's signed file URLs (`sandbox.downloadUrl` / `uploadUrl`): `v1_` + base64 (unpadded) of
 * SHA-256 over `path:operation:user:accessToken[:expiration]`, carried in the query. True when
 * `signature` is that for `token`.
 */
export function signatureMatches(
  q: { path: string; operation: 'read' | 'write'; user: string; signature: string; expiration: string | null },
  token: string,
): boolean {
  const raw = `${q.path}:${q.operation}:${q.user}:${token}${q.expiration !== null ? `:${q.expiration}` : ''}`;
  const expected = `v1_${createHash('sha256').update(raw).digest('base64').replace(/=+$/, '')}`;
  return same(expected, q.signature);
}

/** The daemon's view of the key file: re-read when it changes. */
export class E2bKeys {
  private key: string;
  private mtimeMs: number;

  private constructor(
    private readonly file: string,
    key: string,
  ) {
    this.key = key;
    this.mtimeMs = statSync(file).mtimeMs;
  }

  static async open(home: string): Promise<E2bKeys> {
    const key = await ensureKey(home);
    return new E2bKeys(path.join(home, KEY_FILE), key);
  }

  /** The current key (after a rotation, the new one). */
  current(): string {
    const st = (() => {
      try {
        return statSync(this.file);
      } catch {
        return undefined;
      }
    })();
    if (st && st.mtimeMs !== this.mtimeMs) {
      const text = readFileSync(this.file, 'utf8').trim();
      if (/^e2b_[0-9a-f]{40}$/.test(text)) {
        this.key = text;
        this.mtimeMs = st.mtimeMs;
      }
    }
    return this.key;
  }

  /** Throws UNAUTHENTICATED unless `given` is the key. Never names the key. */
  checkApiKey(given: string | undefined): void {
    if (given === undefined || given === '')
      throw new AegisError('UNAUTHENTICATED', 'missing X-API-Key: set E2B_API_KEY (`aegis e2b env` prints it)');
    if (!same(given, this.current())) throw new AegisError('UNAUTHENTICATED', 'invalid X-API-Key (`aegis e2b env` prints the current one)');
  }

  /** The access token envd calls to sandbox `id` carry. */
  accessToken(id: string): string {
    return createHmac('sha256', this.current()).update(`envd-access:${id}`).digest('hex').slice(0, 48);
  }

  /** The token getHost traffic needs for a sandbox made with `allowPublicTraffic: false`. */
  trafficToken(id: string): string {
    return createHmac('sha256', this.current()).update(`traffic-access:${id}`).digest('hex').slice(0, 48);
  }

  checkTrafficToken(id: string, token: string | undefined): void {
    if (token !== undefined && token !== '' && same(token, this.trafficToken(id))) return;
    throw new AegisError('UNAUTHENTICATED', `sandbox ${id} was made with allowPublicTraffic: false: send its e2b-traffic-access-token`);
  }

  /** An envd call is allowed with the sandbox's access token, or with the API key itself. */
  checkAccessToken(id: string, token: string | undefined, apiKey: string | undefined): void {
    if (token !== undefined && token !== '' && same(token, this.accessToken(id))) return;
    if (apiKey !== undefined && apiKey !== '' && same(apiKey, this.current())) return;
    throw new AegisError('UNAUTHENTICATED', `missing or invalid X-Access-Token for sandbox ${id}`);
  }
}
