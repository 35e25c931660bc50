import { Command } from 'commander';
import { formatPorts } from '../../ports.js';
import { age, client, fail, shellJoin, table } from '../../util.js';

export function listCommand(name: 'list' | 'ps' = 'list'): Command {
  const c = new Command(name);
  if (name === 'list') c.alias('ls');
  return c
    .description('list instances (running ones; --all for every one)')
    .option('-a, --all', 'include stopped and failed instances')
    .option('-q, --quiet', 'print ids only')
    .option('--json', 'print JSON')
    .action(async (o: { all?: boolean; json?: boolean; quiet?: boolean }) => {
      try {
        const list = await client().listInstances({ all: o.all === true });
        if (o.quiet) {
          process.stdout.write(list.map((i) => `${i.id.slice(0, 12)}\n`).join(''));
          return;
        }
        if (o.json) {
          process.stdout.write(JSON.stringify(list, null, 2) + '\n');
          return;
        }
        const rows = [['HANDLE', 'ID', 'STATE', 'IMAGE', 'AGE', 'PORTS', 'COMMAND']];
        for (const i of list) {
          const state = i.exitCode !== null && i.state === 'stopped' ? `stopped (${i.exitCode})` : i.state;
          const cmd = shellJoin(i.command);
          const ports = i.state === 'running' || i.state === 'paused' ? formatPorts(i.ports) : '';
          const image = i.image ? i.image.replace(/^docker\.io\/(library\/)?/, '') : '-';
          rows.push([i.handle, i.id.slice(0, 12), state, image, age(i.createdAt), ports, cmd.length > 40 ? `${cmd.slice(0, 37)}...` : cmd]);
        }
        process.stdout.write(table(rows));
      } catch (err) {
        fail(err);
      }
    });
}
