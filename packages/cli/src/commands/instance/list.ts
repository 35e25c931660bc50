import { Command } from 'commander';
import { formatPorts } from '../../ports.js';
import { InvalidArgumentError } from 'commander';
import type { Instance } from '@aegis/client';
import { age, client, errorsAsJson, fail, shellJoin, table } from '../../util.js';

type Filter = (i: Instance) => boolean;

/** Docker's `--filter KEY=VALUE`: status (or state), name (substring), id (prefix), label (`k` or `k=v`). Repeatable; all must hold. */
function collectFilter(v: string, previous: Filter[] = []): Filter[] {
  const eq = v.indexOf('=');
  const key = v.slice(0, eq);
  const value = v.slice(eq + 1);
  let f: Filter;
  if (eq < 1) throw new InvalidArgumentError(`"${v}" is not KEY=VALUE`);
  else if (key === 'status' || key === 'state') f = (i) => i.state === value;
  else if (key === 'name') f = (i) => i.handle.includes(value);
  else if (key === 'id') f = (i) => i.id.startsWith(value);
  else if (key === 'label') {
    const at = value.indexOf('=');
    const [k, v] = at < 0 ? [value, undefined] : [value.slice(0, at), value.slice(at + 1)];
    f = (i) => i.labels !== undefined && Object.hasOwn(i.labels, k) && (v === undefined || i.labels[k] === v);
  } else throw new InvalidArgumentError(`unknown filter "${key}": use status, name, id or label`);
  return [...previous, f];
}

export function listCommand(name: 'list' | 'ps' = 'list'): Command {
  const c = new Command(name);
  if (name === 'list') c.alias('ls');
  return c
    .description('list instances (running ones; --all for every one)')
    .option('-a, --all', 'include stopped and failed instances')
    .option('-q, --quiet', 'print ids only')
    .option('-f, --filter <KEY=VALUE>', 'only instances with status=STATE, name=TEXT, id=PREFIX or label=K[=V] (repeatable)', collectFilter)
    .option('--json', 'print JSON')
    .action(async (o: { all?: boolean; json?: boolean; quiet?: boolean; filter?: Filter[] }) => {
      errorsAsJson(o.json);
      try {
        // A status filter other than running looks at every instance, as docker ps does.
        const all = o.all === true || o.filter !== undefined;
        const list = (await client().listInstances({ all })).filter((i) => (o.filter ?? []).every((f) => f(i)));
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
          const state = i.exitCode !== null && i.state === 'stopped' ? `stopped (${i.exitCode})` : i.idlePaused ? 'paused (idle)' : i.state;
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
