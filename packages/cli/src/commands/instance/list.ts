import { Command } from 'commander';
import { formatPorts } from '../../ports.js';
import { InvalidArgumentError } from 'commander';
import type { Instance } from '@aegis/client';
import { age, client, errorsAsJson, fail, shellJoin, table } from '../../util.js';
import { parseTemplate, type Template } from '../../format.js';

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

/** Docker's `ps --format` names, beside the instance's own fields. */
function psRow(
  i: Instance,
): Instance & Record<'ID' | 'Names' | 'Image' | 'Command' | 'State' | 'Status' | 'Ports' | 'CreatedAt' | 'RunningFor' | 'Labels', string> {
  return {
    ...i,
    ID: i.id.slice(0, 12),
    Names: i.handle,
    Image: i.image ? i.image.replace(/^docker\.io\/(library\/)?/, '') : '-',
    Command: shellJoin(i.command),
    State: i.state,
    Status: i.exitCode !== null && i.state === 'stopped' ? `stopped (${i.exitCode})` : i.idlePaused ? 'paused (idle)' : i.state,
    Ports: i.state === 'running' || i.state === 'paused' || i.state === 'hibernated' ? formatPorts(i.ports) : '',
    CreatedAt: i.createdAt,
    RunningFor: age(i.createdAt),
    Labels: Object.entries(i.labels ?? {})
      .map(([k, v]) => `${k}=${v}`)
      .join(','),
  };
}

const DOCKER_HEADERS: Record<string, string> = { NAMES: 'NAMES', ID: 'INSTANCE ID', RUNNINGFOR: 'CREATED', CREATEDAT: 'CREATED AT' };

export function listCommand(name: 'list' | 'ps' = 'list'): Command {
  const c = new Command(name);
  if (name === 'list') c.alias('ls');
  return c
    .description('list instances (running ones; --all for every one)')
    .option('-a, --all', 'include stopped and failed instances')
    .option('-q, --quiet', 'print ids only')
    .option('-f, --filter <KEY=VALUE>', 'only instances with status=STATE, name=TEXT, id=PREFIX or label=K[=V] (repeatable)', collectFilter)
    .option('--json', 'print JSON')
    .option(
      '--format <TEMPLATE>',
      'Go-template subset as docker ps: {{.Names}} {{.ID}} {{.Image}} {{.Status}} {{.Ports}} {{.Command}} {{.RunningFor}} {{.Labels}}, our own fields ({{.handle}}, {{json .egress}}…), "table …" for a header',
      (t: string) => parseTemplate(t, DOCKER_HEADERS),
    )
    .action(async (o: { all?: boolean; json?: boolean; quiet?: boolean; filter?: Filter[]; format?: Template }) => {
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
        if (o.format) {
          const t = o.format;
          const lines = list.map((i) => t.render(psRow(i)));
          // `table`: columns aligned under a header, as Docker's tabwriter does.
          const out = t.header === undefined ? lines.map((l) => `${l}\n`).join('') : table([t.header, ...lines].map((l) => l.split('\t')));
          process.stdout.write(out);
          return;
        }
        const rows = [['HANDLE', 'ID', 'STATE', 'IMAGE', 'AGE', 'PORTS', 'COMMAND']];
        for (const i of list) {
          const r = psRow(i);
          const cmd = r.Command.length > 40 ? `${r.Command.slice(0, 37)}...` : r.Command;
          rows.push([r.Names, r.ID, r.Status, r.Image, r.RunningFor, r.Ports, cmd]);
        }
        process.stdout.write(table(rows));
      } catch (err) {
        fail(err);
      }
    });
}
