import { Command, InvalidArgumentError } from 'commander';
import type { EventsOptions, LifecycleEvent } from '@aegis/client';
import { parseTemplate, type Template } from '../format.js';
import { client, errorsAsJson, fail } from '../util.js';
import { parseSince } from './logs.js';

interface Filters {
  types: string[];
  instances: string[];
  labels: string[];
}

/**
 * Docker's `--filter KEY=VALUE`, repeatable: `event=` (or `type=`) an event type, `instance=`
 * (or `container=`) a handle or id, `label=` `k` or `k=v`. Values of one key match any of them;
 * keys combine, as docker events does.
 */
function collectFilter(v: string, f: Filters = { types: [], instances: [], labels: [] }): Filters {
  const eq = v.indexOf('=');
  if (eq < 1) throw new InvalidArgumentError(`"${v}" is not KEY=VALUE`);
  const key = v.slice(0, eq);
  const value = v.slice(eq + 1);
  if (key === 'event' || key === 'type') f.types.push(value);
  else if (key === 'instance' || key === 'container') f.instances.push(value);
  else if (key === 'label') f.labels.push(value);
  else throw new InvalidArgumentError(`unknown filter "${key}": use event=, instance= or label=`);
  return f;
}

/** One line as docker events prints one: time, type, instance, then what else it says. */
export function eventLine(ev: LifecycleEvent): string {
  const attrs: string[] = [];
  if (ev.instanceId) attrs.push(`id=${ev.instanceId}`);
  if (ev.state) attrs.push(`state=${ev.state}`);
  if (ev.exitCode !== undefined) attrs.push(`exitCode=${ev.exitCode === null ? 'none' : ev.exitCode}`);
  if (ev.snapshot) attrs.push(`snapshot=${ev.snapshot}`);
  if (ev.forks) attrs.push(`forks=${ev.forks.join(',')}`);
  if (ev.destination) attrs.push(`destination=${ev.destination}`);
  if (ev.suppressed) attrs.push(`suppressed=${ev.suppressed}`);
  for (const [k, v] of Object.entries(ev.labels ?? {})) attrs.push(`${k}=${v}`);
  if (ev.reason) attrs.push(`reason=${JSON.stringify(ev.reason)}`);
  return `${new Date(ev.timeMs).toISOString()} instance ${ev.type} ${ev.handle ?? '-'} (${attrs.join(', ')})\n`;
}

export function eventsCommand(): Command {
  return new Command('events')
    .description('stream lifecycle events of instances (create, start, exit, stop, pause, hibernate, fork, delete…), as docker events')
    .option('--since <time>', 'stored events from then first: 10m, 2h, 2026-01-02T15:04:05Z, or Unix seconds', (v) => parseSince(v))
    .option('--until <time>', 'stop at this time (events stored until then, without waiting for new ones if it has passed)', (v) =>
      parseSince(v),
    )
    .option('-f, --filter <key=value>', 'event=TYPE, instance=HANDLE, label=K[=V] (repeatable)', collectFilter)
    .option('--format <template>', 'print each event with a Go template, e.g. "{{.type}} {{.handle}}"', (t: string) => parseTemplate(t))
    .option('--json', 'one JSON object per event, as the API gives it')
    .action(async (o: { since?: number; until?: number; filter?: Filters; format?: Template; json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        if (o.since !== undefined && o.until !== undefined && o.until < o.since)
          throw new InvalidArgumentError('--until is before --since');
        // Like docker events: live events until --until (or ^C); an --until in the past only reads what is stored.
        const follow = o.until === undefined || o.until > Date.now();
        const opts: EventsOptions = {
          follow,
          ...(o.since !== undefined ? { sinceMs: o.since } : {}),
          ...(o.until !== undefined ? { untilMs: o.until } : {}),
          ...(o.filter?.types.length ? { types: o.filter.types as LifecycleEvent['type'][] } : {}),
          ...(o.filter?.instances.length ? { instances: o.filter.instances } : {}),
          ...(o.filter?.labels.length ? { labels: o.filter.labels } : {}),
        };
        for await (const ev of client().events(opts)) {
          if (o.json) process.stdout.write(JSON.stringify(ev) + '\n');
          else if (o.format) process.stdout.write(o.format.render(ev) + '\n');
          else process.stdout.write(eventLine(ev));
        }
      } catch (err) {
        fail(err);
      }
    });
}
