import { constants as osConstants } from 'node:os';
import { Command } from 'commander';
import { client, collectEnv, commandArgs, exit, fail, writeOutput } from '../util.js';

interface ExecOptions {
  env?: Record<string, string>;
  workdir?: string;
  interactive?: boolean;
}

export function execCommand(): Command {
  return new Command('exec')
    .description('run a command in a running instance')
    .option('-i, --interactive', 'pass our stdin to the command')
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collectEnv)
    .option('-w, --workdir <dir>', 'working directory in the guest')
    .argument('<instance>', 'handle, id or id prefix')
    .argument('<command...>', 'command to run (after --)')
    .passThroughOptions()
    .action(async (ref: string, command: string[], o: ExecOptions) => {
      const api = client();
      let code = 1;
      let execId: string | undefined;
      let interrupts = 0;
      // Ctrl-C goes to the command in the guest, as it would to a local one.
      const onSigint = (): void => {
        if (!execId || ++interrupts > 2) process.exit(130);
        void api.signalExec(ref, execId, interrupts === 1 ? 'SIGINT' : 'SIGKILL').catch(() => undefined);
      };
      process.on('SIGINT', onSigint);
      try {
        const req = {
          command: commandArgs(command),
          ...(o.env ? { env: o.env } : {}),
          ...(o.workdir ? { workdir: o.workdir } : {}),
          ...(o.interactive ? { stdin: true } : {}),
        };
        let pumping: Promise<void> | undefined;
        for await (const ev of api.exec(ref, req)) {
          if (ev.type === 'started') {
            execId = ev.execId;
            if (o.interactive) pumping = pumpStdin(ref, ev.execId);
          } else if (ev.type === 'output') writeOutput(ev.stream, ev.data);
          else if (ev.type === 'exit') code = ev.exitCode ?? 128 + signalNumber(ev.signal);
        }
        process.stdin.destroy(); // the command is done: stop reading
        await pumping;
      } catch (err) {
        fail(err);
      }
      exit(code);
    });
}

/** Copies our stdin to the exec, one request per chunk, then closes it. */
async function pumpStdin(ref: string, execId: string): Promise<void> {
  const api = client();
  try {
    for await (const chunk of process.stdin as AsyncIterable<Buffer>) await api.execInput(ref, execId, { data: chunk });
    await api.execInput(ref, execId, { eof: true });
  } catch {
    // The command ended first: what it did not read is dropped, as with a closed pipe.
  }
}

/** Shell convention: 128 + the signal's number. */
function signalNumber(name: string | null): number {
  return (name ? (osConstants.signals as Record<string, number | undefined>)[name] : undefined) ?? 127;
}
