import { Command } from 'commander';
import type { Volume } from '@aegis/client';
import { age, client, errorsAsJson, exit, fail, mibParser, printError, table } from '../util.js';

/** `--size`: `512m`, `1g`, `1.5g`, or MiB; 16m to 1t. */
export const parseSize = mibParser(16, 1 << 20, '16m to 1t');

const size = (mib: number): string => (mib % 1024 === 0 ? `${mib / 1024} GiB` : `${mib} MiB`);
const used = (bytes: number): string => `${(bytes / (1 << 20)).toFixed(1)} MiB`;

function rows(volumes: Volume[]): string[][] {
  return [
    ['NAME', 'SIZE', 'USED', 'CREATED', 'INSTANCES'],
    ...volumes.map((v) => [v.name, size(v.sizeMiB), used(v.allocatedBytes), `${age(v.createdAt)} ago`, v.usedBy.join(',') || '-']),
  ];
}

/** `aegis volume …`: named volumes, ext4 disks of their own that outlive instances (docker volume). */
export function volumeCommand(): Command {
  const volume = new Command('volume').description('named volumes: disks that outlive instances (-v NAME:/path)');
  volume
    .command('create')
    .description('create a named volume (an existing one is left as it is, as docker does)')
    .argument('<NAME>', 'letters, digits, _ . - (starting with a letter or digit)')
    .option('--size <size>', 'file system size: 512m, 1g, ... (sparse: costs what is written; default 1g)', parseSize)
    .option('--json', 'print the volume as JSON')
    .action(async (name: string, o: { size?: number; json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const v = await client().createVolume(name, o.size !== undefined ? { sizeMiB: o.size } : {});
        process.stdout.write(o.json ? `${JSON.stringify(v, null, 2)}\n` : `${v.name}\n`);
      } catch (err) {
        fail(err);
      }
    });
  volume
    .command('list')
    .alias('ls')
    .description('named volumes: size, space used, instances naming them')
    .option('--json', 'print JSON')
    .option('-q, --quiet', 'names only')
    .action(async (o: { json?: boolean; quiet?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const list = await client().listVolumes();
        if (o.json) process.stdout.write(JSON.stringify(list, null, 2) + '\n');
        else if (o.quiet) process.stdout.write(list.map((v) => `${v.name}\n`).join(''));
        else process.stdout.write(table(rows(list)));
      } catch (err) {
        fail(err);
      }
    });
  volume
    .command('inspect')
    .description('show volumes as JSON')
    .argument('<NAME...>')
    .action(async (names: string[]) => {
      try {
        const c = client();
        const found: Volume[] = [];
        for (const n of names) found.push(await c.getVolume(n));
        process.stdout.write(JSON.stringify(found, null, 2) + '\n');
      } catch (err) {
        fail(err);
      }
    });
  volume
    .command('rm')
    .alias('remove')
    .description('remove volumes and their data; refused while an instance (running or not) names one')
    .argument('<NAME...>')
    .action(async (names: string[]) => {
      // As `docker volume rm`: each name in turn, an error for one does not stop the others.
      let failed = false;
      const c = client();
      for (const n of names) {
        try {
          await c.removeVolume(n);
          process.stdout.write(`${n}\n`);
        } catch (err) {
          printError(err);
          failed = true;
        }
      }
      if (failed) exit(1);
    });
  return volume;
}
