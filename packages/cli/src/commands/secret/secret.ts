import { Command } from 'commander';
import { client, errorsAsJson, fail, table } from '../../util.js';

async function readStdin(): Promise<string> {
  const chunks: Buffer[] = [];
  for await (const c of process.stdin as AsyncIterable<Buffer>) chunks.push(c);
  // `echo value | aegis secret set K -` should not store echo's newline.
  return Buffer.concat(chunks)
    .toString('utf8')
    .replace(/\r?\n$/, '');
}

export function secretCommand(): Command {
  const secret = new Command('secret').description('store secrets (encrypted at rest) for workloads');
  secret
    .command('set')
    .description('create or replace a secret; VALUE "-" reads it from stdin (keeps it out of shell history)')
    .argument('<KEY>', 'name: letters, digits, _')
    .argument('<VALUE>', 'the value, or - for stdin')
    .option(
      '--host <NAME>',
      'broker it: instances see a placeholder, and aegisd puts the value in its place only in HTTP(S) requests to this host ' +
        '(a name or *.suffix; repeatable). Without --host the value itself goes into the environment',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .action(async (key: string, value: string, o: { host?: string[] }) => {
      try {
        const v = value === '-' ? await readStdin() : value;
        await client().setSecret(key, v, o.host ?? []);
        process.stdout.write(`${key}\n`);
      } catch (err) {
        fail(err);
      }
    });
  secret
    .command('list')
    .alias('ls')
    .description('names and dates (never values)')
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const list = await client().listSecrets();
        if (o.json) {
          process.stdout.write(JSON.stringify(list, null, 2) + '\n');
          return;
        }
        process.stdout.write(
          table([
            ['NAME', 'HOSTS', 'CREATED', 'UPDATED'],
            ...list.map((s) => [s.name, s.hosts?.join(',') ?? '-', s.createdAt, s.updatedAt]),
          ]),
        );
      } catch (err) {
        fail(err);
      }
    });
  secret
    .command('delete')
    .alias('rm')
    .description('delete a secret')
    .argument('<KEY>')
    .action(async (key: string) => {
      try {
        await client().deleteSecret(key);
        process.stdout.write(`${key}\n`);
      } catch (err) {
        fail(err);
      }
    });
  return secret;
}
