import { Command, InvalidArgumentError } from 'commander';
import type { Stream } from '@aegis/client';
import { client, errorsAsJson, fail, positiveInt, writeOutput } from '../util.js';

/** `--since`: a duration back from now (90s, 10m, 2h, 1d), an RFC 3339 time, or Unix seconds. */
export function parseSince(v: string, now = Date.now()): number {
  const d = /^(\d+)(ms|s|m|h|d)$/.exec(v);
  if (d) {
    const unit = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 }[d[2] as 'ms' | 's' | 'm' | 'h' | 'd'];
    return now - Number(d[1]) * unit;
  }
  if (/^\d+(\.\d+)?$/.test(v)) return Math.round(Number(v) * 1000);
  const t = Date.parse(v);
  if (Number.isNaN(t)) throw new InvalidArgumentError('use a duration (10m, 2h), an RFC 3339 time or Unix seconds');
  return t;
}

export function logsCommand(): Command {
  return new Command('logs')
    .description("print an instance's output (kept after it stops)")
    .argument('<instance>', 'handle, id or id prefix')
    .option('-f, --follow', 'keep printing new output until the instance stops')
    .option('-n, --tail <n>', 'only the last n lines', positiveInt('--tail', 0, 1_000_000_000))
    .option('--since <time>', 'only output since then: 10m, 2h, 2026-01-02T15:04:05Z, or Unix seconds', (v) => parseSince(v))
    .option('-t, --timestamps', 'prefix each line with the time it was written')
    .option('--execs', 'include the output of execs, marked [exec <id>]')
    .option('--json', 'one JSON line per entry: {stream, text, timeMs, execId?} (text decoded as UTF-8), then {end} with --follow')
    .action(
      async (
        ref: string,
        o: { follow?: boolean; tail?: number; since?: number; timestamps?: boolean; execs?: boolean; json?: boolean },
      ) => {
        errorsAsJson(o.json);
        try {
          const opts = {
            follow: o.follow === true,
            execs: o.execs === true,
            ...(o.tail !== undefined ? { tail: o.tail } : {}),
            ...(o.since !== undefined ? { sinceMs: o.since } : {}),
          };
          const atLineStart: Record<Stream, boolean> = { stdout: true, stderr: true };
          for await (const ev of client().logs(ref, opts)) {
            if (o.json) {
              const { type, ...rest } = ev;
              const line =
                type === 'output'
                  ? {
                      stream: ev.stream,
                      text: Buffer.from(ev.data, 'base64').toString('utf8'),
                      timeMs: ev.timeMs,
                      ...(ev.execId !== undefined ? { execId: ev.execId } : {}),
                    }
                  : { end: rest };
              process.stdout.write(JSON.stringify(line) + '\n');
              continue;
            }
            if (ev.type !== 'output') continue;
            if (!o.timestamps && ev.execId === undefined) {
              writeOutput(ev.stream, ev.data);
              continue;
            }
            const prefix = `${o.timestamps ? `${new Date(ev.timeMs).toISOString()} ` : ''}${ev.execId !== undefined ? `[exec ${ev.execId}] ` : ''}`;
            const text = Buffer.from(ev.data, 'base64').toString('utf8');
            let out = '';
            for (const piece of text.split(/(?<=\n)/)) {
              out += (atLineStart[ev.stream] ? prefix : '') + piece;
              atLineStart[ev.stream] = piece.endsWith('\n');
            }
            (ev.stream === 'stdout' ? process.stdout : process.stderr).write(out);
          }
        } catch (err) {
          fail(err);
        }
      },
    );
}
