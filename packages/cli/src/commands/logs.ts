import { Command } from 'commander';
import { client, fail, positiveInt, writeOutput } from '../util.js';

export function logsCommand(): Command {
  return new Command('logs')
    .description("print an instance's output (kept after it stops)")
    .argument('<instance>', 'handle, id or id prefix')
    .option('-f, --follow', 'keep printing new output until the instance stops')
    .option('-n, --tail <n>', 'only the last n chunks', positiveInt('--tail', 0, 1_000_000_000))
    .action(async (ref: string, o: { follow?: boolean; tail?: number }) => {
      try {
        const opts = { follow: o.follow === true, ...(o.tail !== undefined ? { tail: o.tail } : {}) };
        for await (const ev of client().logs(ref, opts)) {
          if (ev.type === 'output') writeOutput(ev.stream, ev.data);
        }
      } catch (err) {
        fail(err);
      }
    });
}
