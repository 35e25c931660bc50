import { constants as osConstants } from 'node:os';
import { Command } from 'commander';
import { client, collectEnv, commandArgs, exit, fail, writeOutput } from '../util.js';

export function execCommand(): Command {
  return new Command('exec')
    .description('run a command in a running instance')
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collectEnv)
    .option('-w, --workdir <dir>', 'working directory in the guest')
    .argument('<instance>', 'handle, id or id prefix')
    .argument('<command...>', 'command to run (after --)')
    .passThroughOptions()
    .action(async (ref: string, command: string[], o: { env?: Record<string, string>; workdir?: string }) => {
      let code = 1;
      try {
        const req = { command: commandArgs(command), ...(o.env ? { env: o.env } : {}), ...(o.workdir ? { workdir: o.workdir } : {}) };
        for await (const ev of client().exec(ref, req)) {
          if (ev.type === 'output') writeOutput(ev.stream, ev.data);
          else if (ev.type === 'exit') code = ev.exitCode ?? 128 + signalNumber(ev.signal);
        }
      } catch (err) {
        fail(err);
      }
      exit(code);
    });
}

/** Shell convention: 128 + the signal's number. */
function signalNumber(name: string | null): number {
  return (name ? (osConstants.signals as Record<string, number | undefined>)[name] : undefined) ?? 127;
}
