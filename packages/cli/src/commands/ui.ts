/**
 * `aegis ui [--open]`: the dashboard's URL with its token. An aegisd serving the dashboard
 * (`aegis up --ui`, AEGIS_UI_ADDR) writes its address to `$AEGIS_HOME/ui.addr` and keeps the
 * token in `$AEGIS_HOME/ui.token` (0600); the format of both is aegisd's
 * (packages/daemon/src/ui/server.ts): the CLI does not import daemon code.
 */
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Command } from 'commander';
import { AegisError, isAegisError } from '@aegis/client';
import { client, fail } from '../util.js';

const NOT_SERVED =
  'aegisd does not serve the dashboard: restart it with `aegis down && aegis up --ui [127.0.0.1:PORT]` (or set AEGIS_UI_ADDR)';

/** The program that opens a URL in the desktop's browser, where there is one. */
async function opener(): Promise<string | undefined> {
  const names = process.platform === 'darwin' ? ['open'] : ['xdg-open'];
  for (const dir of (process.env['PATH'] ?? '').split(path.delimiter)) {
    for (const name of names) {
      const file = path.join(dir, name);
      if (
        await fs.access(file, fs.constants.X_OK).then(
          () => true,
          () => false,
        )
      )
        return file;
    }
  }
  return undefined;
}

export function uiCommand(): Command {
  return new Command('ui')
    .description('print the dashboard URL (with its token) and exit; served by `aegis up --ui`')
    .option('--open', 'also open it in a browser (xdg-open / open)')
    .action(async (o: { open?: boolean }) => {
      try {
        const api = client();
        try {
          await api.status();
        } catch (err) {
          if (isAegisError(err, 'UNAVAILABLE'))
            throw new AegisError(
              'FAILED_PRECONDITION',
              `aegisd is not running: ${NOT_SERVED.replace('restart it with `aegis down && ', 'start it with `')}`,
            );
          throw err;
        }
        const home = path.dirname(api.socketPath);
        const base = (await fs.readFile(path.join(home, 'ui.addr'), 'utf8').catch(() => '')).trim();
        const token = (await fs.readFile(path.join(home, 'ui.token'), 'utf8').catch(() => '')).trim();
        if (!base || !token) throw new AegisError('FAILED_PRECONDITION', NOT_SERVED);
        const url = `${base}/?token=${token}`;
        process.stdout.write(`${url}\n`);
        if (o.open) {
          const program = await opener();
          if (!program) {
            process.stderr.write('no xdg-open or open here: open the URL above in a browser\n');
            return;
          }
          spawn(program, [url], { detached: true, stdio: 'ignore' }).unref();
        }
      } catch (err) {
        fail(err);
      }
    });
}
