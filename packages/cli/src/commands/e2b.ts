/**
 * `aegis e2b env` / `aegis e2b key [--rotate]`: the E2B endpoint's settings for a shell. The key
 * file (`$AEGIS_HOME/e2b.key`, 0600) is the one aegisd reads (and re-reads when it changes, so a
 * rotation needs no restart); `$AEGIS_HOME/e2b.addr` is written by an aegisd that serves the
 * endpoint (`aegis up --e2b`, AEGIS_E2B_ADDR). The format of both is aegisd's
 * (packages/daemon/src/e2b/keys.ts): the CLI does not import daemon code.
 */
import { randomBytes } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { AegisError } from '@aegis/client';
import { client, fail } from '../util.js';

const KEY_RE = /^e2b_[0-9a-f]{40}$/;

function home(): string {
  return path.dirname(client().socketPath);
}

async function writeKey(dir: string): Promise<string> {
  const key = `e2b_${randomBytes(20).toString('hex')}`;
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const file = path.join(dir, 'e2b.key');
  const temp = `${file}.${randomBytes(4).toString('hex')}`;
  await fs.writeFile(temp, `${key}\n`, { mode: 0o600, flag: 'wx' });
  await fs.rename(temp, file);
  return key;
}

/** The key, made when there is none. */
async function key(dir: string): Promise<string> {
  const text = (await fs.readFile(path.join(dir, 'e2b.key'), 'utf8').catch(() => '')).trim();
  return KEY_RE.test(text) ? text : writeKey(dir);
}

/** A value for a POSIX shell's `export`. */
function shellQuote(v: string): string {
  return /^[A-Za-z0-9_./:@-]+$/.test(v) ? v : `'${v.replaceAll("'", "'\\''")}'`;
}

export function e2bCommand(): Command {
  const e2b = new Command('e2b').description("E2B's SDKs against this aegisd (aegis up --e2b serves their API on loopback)");
  e2b
    .command('env')
    .description('print `export E2B_API_URL=… E2B_SANDBOX_URL=… E2B_API_KEY=…` for eval "$(aegis e2b env)"')
    .action(async () => {
      try {
        const dir = home();
        const url = (await fs.readFile(path.join(dir, 'e2b.addr'), 'utf8').catch(() => '')).trim();
        if (!url) {
          throw new AegisError(
            'FAILED_PRECONDITION',
            'aegisd does not serve the E2B API: start it with `aegis up --e2b [127.0.0.1:PORT]` (or AEGIS_E2B_ADDR)',
          );
        }
        const k = await key(dir);
        process.stdout.write(`export E2B_API_URL=${shellQuote(url)} E2B_SANDBOX_URL=${shellQuote(url)} E2B_API_KEY=${shellQuote(k)}\n`);
      } catch (err) {
        fail(err);
      }
    });
  e2b
    .command('key')
    .description('print the E2B API key (made on first use); --rotate replaces it, which also revokes every sandbox access token')
    .option('--rotate', 'make a new key (aegisd takes it at the next request)')
    .action(async (o: { rotate?: boolean }) => {
      try {
        const dir = home();
        process.stdout.write(`${o.rotate ? await writeKey(dir) : await key(dir)}\n`);
      } catch (err) {
        fail(err);
      }
    });
  return e2b;
}
