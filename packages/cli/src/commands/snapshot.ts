/**
 * `aegis snapshot …` (checkpoints of running instances) and `aegis fork`: a running machine
 * saved whole (memory, devices, disk) and started again as new instances that carry on from
 * that point.
 */
import { Command } from 'commander';
import type { SnapshotView } from '@aegis/client';
import { age, client, eachRef, errorsAsJson, exit, fail, forEach, formatBytes, positiveInt, table } from '../util.js';

function rows(list: SnapshotView[]): string[][] {
  return [
    ['NAME', 'SOURCE', 'MEMORY', 'SIZE', 'CREATED', 'INSTANCES'],
    ...list.map((s) => [
      s.name,
      s.source.handle,
      `${s.memoryMiB} MiB`,
      formatBytes(s.sizeBytes),
      `${age(s.createdAt)} ago`,
      s.dependents.join(',') || '-',
    ]),
  ];
}

export function snapshotCommand(): Command {
  const snapshot = new Command('snapshot').description(
    'checkpoints of running instances: memory, devices and disk, to start again as new instances',
  );
  snapshot
    .command('create')
    .description('checkpoint a running instance (it is paused only for the copy, then carries on); prints the snapshot name')
    .argument('<instance>', 'handle, id or id prefix')
    .option('--name <NAME>', 'its name (default: <handle>-<time>)')
    .option('--json', 'print the snapshot as JSON')
    .action(async (ref: string, o: { name?: string; json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const s = await client().createSnapshot(ref, o.name !== undefined ? { name: o.name } : {});
        process.stdout.write(o.json ? `${JSON.stringify(s, null, 2)}\n` : `${s.name}\n`);
      } catch (err) {
        fail(err);
      }
    });
  snapshot
    .command('list')
    .alias('ls')
    .description('snapshots: the instance each was taken of, the memory it needs, the space it takes, the instances started from it')
    .option('--json', 'print JSON')
    .option('-q, --quiet', 'names only')
    .action(async (o: { json?: boolean; quiet?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const list = await client().listSnapshots();
        if (o.json) process.stdout.write(JSON.stringify(list, null, 2) + '\n');
        else if (o.quiet) process.stdout.write(list.map((s) => `${s.name}\n`).join(''));
        else process.stdout.write(table(rows(list)));
      } catch (err) {
        fail(err);
      }
    });
  snapshot
    .command('inspect')
    .description('show snapshots as JSON')
    .argument('<NAME...>')
    .action(async (names: string[]) => {
      const { results, failed } = await eachRef(names, (n) => client().getSnapshot(n));
      process.stdout.write(JSON.stringify(results, null, 2) + '\n');
      if (failed) exit(1);
    });
  snapshot
    .command('rm')
    .alias('remove')
    .description('remove snapshots; refused while an instance started from one exists')
    .argument('<NAME...>')
    .action((names: string[]) =>
      forEach(names, async (n) => {
        await client().deleteSnapshot(n);
        return n;
      }),
    );
  return snapshot;
}

export function forkCommand(): Command {
  return new Command('fork')
    .description(
      'checkpoint a running instance and start N instances from that point (each its own identity, disk and ports); prints their handles',
    )
    .argument('<instance>', 'handle, id or id prefix')
    .option('-n, --count <N>', 'how many (default 1)', positiveInt('--count', 1, 64))
    .option('--name <handle>', 'a handle for each fork (repeatable, as many as -n)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--json', 'print the forks as JSON')
    .action(async (ref: string, o: { count?: number; name?: string[]; json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const r = await client().forkInstance(ref, {
          ...(o.count !== undefined ? { count: o.count } : {}),
          ...(o.name ? { names: o.name } : {}),
        });
        process.stdout.write(o.json ? `${JSON.stringify(r, null, 2)}\n` : r.instances.map((i) => `${i.handle}\n`).join(''));
      } catch (err) {
        fail(err);
      }
    });
}
