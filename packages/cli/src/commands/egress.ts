import { Command } from 'commander';
import type { EgressView } from '@aegis/client';
import { client, errorsAsJson, fail, table } from '../util.js';

const bytes = (n: number): string =>
  n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KiB` : `${(n / (1 << 20)).toFixed(1)} MiB`;

function render(v: EgressView, withLog: boolean): string {
  const mode =
    v.mode === 'off'
      ? `network ${v.network}: no egress policy`
      : v.mode === 'allow-list'
        ? 'allow list: only the destinations below'
        : 'default: public addresses (private, loopback, link-local and the host refused)';
  let out = `${mode}\n`;
  if (v.allow.length) out += `allow: ${v.allow.join(' ')}\n`;
  if (v.deny.length) out += `deny:  ${v.deny.join(' ')}\n`;
  if (v.counters.length) {
    out +=
      '\n' +
      table([
        ['DESTINATION', 'ALLOWED', 'DENIED', 'SENT', 'RECEIVED'],
        ...v.counters.map((c) => [c.destination, String(c.allowed), String(c.denied), bytes(c.bytesOut), bytes(c.bytesIn)]),
      ]);
  }
  if (withLog && v.log?.length) {
    out +=
      '\n' +
      table([
        ['TIME', 'KIND', 'DESTINATION', 'DECISION', 'WHY'],
        ...v.log.map((d) => [
          new Date(d.timeMs).toISOString().slice(11, 23),
          d.kind,
          [d.name, d.address && d.port !== undefined ? `${d.address}:${d.port}` : d.address].filter(Boolean).join(' '),
          d.allowed ? 'allowed' : 'denied',
          d.reason,
        ]),
      ]);
  }
  return out;
}

/** `aegis egress …`: an instance's egress policy, shown and changed while it runs ("install, then lock"). */
export function egressCommand(): Command {
  const egress = new Command('egress').description("an instance's egress policy: show it, allow or deny destinations while it runs");
  egress
    .command('show')
    .description('the policy, per-destination counters and (--log) the latest decisions')
    .argument('<INSTANCE>')
    .option('--log', 'also the latest decisions (at most 1000)')
    .option('--json', 'print JSON')
    .action(async (ref: string, o: { log?: boolean; json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const v = await client().instanceEgress(ref, o.log === true);
        process.stdout.write(o.json ? `${JSON.stringify(v, null, 2)}\n` : render(v, o.log === true));
      } catch (err) {
        fail(err);
      }
    });
  for (const list of ['allow', 'deny'] as const) {
    egress
      .command(list)
      .description(
        list === 'allow'
          ? 'allow these destinations from now on (the first allow rule makes everything else denied)'
          : 'deny these destinations from now on (wins over allow)',
      )
      .argument('<INSTANCE>')
      .argument('<PATTERN...>', 'a name (pypi.org), *.suffix, IP or CIDR, with an optional :PORT')
      .option('--json', 'print the policy as JSON')
      .action(async (ref: string, patterns: string[], o: { json?: boolean }) => {
        errorsAsJson(o.json);
        try {
          const v = await client().updateEgress(ref, { [list]: patterns });
          process.stdout.write(o.json ? `${JSON.stringify(v, null, 2)}\n` : render(v, false));
        } catch (err) {
          fail(err);
        }
      });
  }
  return egress;
}
