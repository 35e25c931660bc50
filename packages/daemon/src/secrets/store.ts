/**
 * Secrets: values encrypted at rest with AES-256-GCM under a 32-byte key file readable only
 * by its owner ($AEGIS_HOME/secrets.key, 0600). The registry holds only iv ‖ tag ‖ ciphertext,
 * bound to the secret's name. Values leave this module only into a workload's environment;
 * no message, log line or listing ever contains one.
 */
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { closeSync, constants, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemas } from '@aegis/protocol/api';
import type { Registry, SecretRow } from '../registry/db.js';
import { parseRules } from '../egress/rules.js';

/** A secret as the API lists it: never its value. */
export type SecretMeta = ApiSchemas['Secret'];

const IV_BYTES = 12;
const TAG_BYTES = 16;
export const SECRET_NAME = /^[A-Za-z_][A-Za-z0-9_]{0,255}$/;

function meta(r: Pick<SecretRow, 'name' | 'hosts' | 'createdAt' | 'updatedAt'>): SecretMeta {
  return {
    name: r.name,
    ...(r.hosts.length > 0 ? { hosts: r.hosts } : {}),
    createdAt: new Date(r.createdAt).toISOString(),
    updatedAt: new Date(r.updatedAt).toISOString(),
  };
}

/** A secret bound to hosts, as an instance's egress broker needs it (egress/broker.ts). */
export interface BrokeredSecret {
  name: string;
  /** What the guest's environment holds instead of the value. */
  placeholder: string;
  value: string;
  hosts: string[];
}

/** A workload's secrets: its environment, and the values the host puts in place of placeholders. */
export interface SecretEnvironment {
  env: Record<string, string>;
  brokered: BrokeredSecret[];
}

export class SecretStore {
  private cachedKey: Buffer | undefined;

  constructor(
    private readonly registry: Registry,
    private readonly keyFile: string,
  ) {}

  /** Loads the key, creating it (exclusively, 0600) on first use; refuses a key others can read. */
  private key(): Buffer {
    if (this.cachedKey) return this.cachedKey;
    try {
      const fd = openSync(this.keyFile, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600);
      try {
        writeSync(fd, randomBytes(32));
      } finally {
        closeSync(fd);
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const st = statSync(this.keyFile);
    if ((st.mode & 0o077) !== 0) {
      throw new AegisError('FAILED_PRECONDITION', `${this.keyFile} is readable by others; chmod 600 it`);
    }
    const key = readFileSync(this.keyFile);
    if (key.length !== 32) throw new AegisError('FAILED_PRECONDITION', `${this.keyFile} is not a 32-byte key`);
    this.cachedKey = key;
    return key;
  }

  private static checkName(name: string): void {
    if (!SECRET_NAME.test(name)) {
      throw new AegisError('INVALID_ARGUMENT', 'a secret name must be letters, digits and _, not starting with a digit');
    }
  }

  set(name: string, value: string, hosts: string[] = []): SecretMeta {
    SecretStore.checkName(name);
    for (const rule of parseRules(hosts, 'allow')) {
      if (rule.target.kind === 'address') {
        throw new AegisError(
          'INVALID_ARGUMENT',
          `secret host ${JSON.stringify(rule.text)}: a name or *.suffix (TLS is checked against a name)`,
        );
      }
    }
    const iv = randomBytes(IV_BYTES);
    const cipher = createCipheriv('aes-256-gcm', this.key(), iv);
    cipher.setAAD(Buffer.from(`aegis-secret:${name}`));
    const ciphertext = Buffer.concat([cipher.update(value, 'utf8'), cipher.final()]);
    const blob = Buffer.concat([iv, cipher.getAuthTag(), ciphertext]);
    return meta(this.registry.putSecret(name, blob, Date.now(), hosts));
  }

  list(): SecretMeta[] {
    return this.registry.listSecrets().map(meta);
  }

  delete(name: string): void {
    SecretStore.checkName(name);
    if (!this.registry.deleteSecret(name)) throw new AegisError('NOT_FOUND', `no secret named ${name} (see: aegis secret list)`);
  }

  /**
   * The values of `names` (`*` means every secret), for a workload's environment. An unknown
   * name fails before anything is started.
   */
  resolve(names: readonly string[], options: { skipMissing?: boolean } = {}): Record<string, string> {
    const rows = names.includes('*')
      ? this.registry.listSecrets()
      : names.flatMap((n) => {
          SecretStore.checkName(n);
          const row = this.registry.getSecret(n);
          if (row) return [row];
          // An exec in an instance whose secret was deleted since: it runs without it.
          if (options.skipMissing) return [];
          throw new AegisError('NOT_FOUND', `no secret named ${n}; set it with: aegis secret set ${n} -`);
        });
    const out: Record<string, string> = {};
    for (const row of rows) out[row.name] = this.decrypt(row);
    return out;
  }

  /**
   * A workload's secrets (`resolve`'s names) for instance `instanceId`: a secret bound to hosts
   * is brokered when `brokering` (the egress policy carries the instance's traffic): its
   * environment variable holds a placeholder derived from the key, the instance and the name
   * (the same after a restart, of aegisd too, with nothing stored), and its value goes only to
   * the broker. Without brokering, a bound secret is refused: handing its value over would be
   * the opposite of what binding it asked for.
   */
  environment(
    names: readonly string[],
    instanceId: string,
    brokering: boolean,
    options: { skipMissing?: boolean } = {},
  ): SecretEnvironment {
    const values = this.resolve(names, options);
    const env: Record<string, string> = {};
    const brokered: BrokeredSecret[] = [];
    for (const [name, value] of Object.entries(values)) {
      const hosts = this.registry.getSecret(name)?.hosts ?? [];
      if (hosts.length === 0) {
        env[name] = value;
        continue;
      }
      if (!brokering) {
        throw new AegisError(
          'FAILED_PRECONDITION',
          `secret ${name} is bound to ${hosts.join(', ')}: brokering it needs the default network (user)`,
        );
      }
      const placeholder = `aegis-secret-${this.derive(`placeholder:${instanceId}:${name}`).subarray(0, 24).toString('hex')}`;
      env[name] = placeholder;
      brokered.push({ name, placeholder, value, hosts });
    }
    return { env, brokered };
  }

  /** A per-instance seed for its egress CA's key (egress/broker.ts): derived, never stored. */
  instanceSeed(instanceId: string): Buffer {
    return this.derive(`egress-ca:${instanceId}`);
  }

  private derive(label: string): Buffer {
    return createHmac('sha256', this.key()).update(label).digest();
  }

  private decrypt(row: SecretRow): string {
    const iv = row.value.subarray(0, IV_BYTES);
    const tag = row.value.subarray(IV_BYTES, IV_BYTES + TAG_BYTES);
    const decipher = createDecipheriv('aes-256-gcm', this.key(), iv);
    decipher.setAAD(Buffer.from(`aegis-secret:${row.name}`));
    decipher.setAuthTag(tag);
    try {
      return Buffer.concat([decipher.update(row.value.subarray(IV_BYTES + TAG_BYTES)), decipher.final()]).toString('utf8');
    } catch {
      throw new AegisError('FAILED_PRECONDITION', `secret ${row.name} cannot be decrypted (was secrets.key replaced?); set it again`);
    }
  }
}
