import { Command } from 'commander';
import { exitStatus } from '@aegis/protocol';
import { client, collectEnv, commandArgs, exit, failCommand, writeOutput } from '../util.js';

interface ExecOptions {
  env?: Record<string, string>;
  workdir?: string;
  interactive?: boolean;
  tty?: boolean;
}

export function execCommand(): Command {
  return new Command('exec')
    .description('run a command in a running instance')
    .option('-i, --interactive', 'pass our stdin to the command')
    .option('-t, --tty', 'run the command on a terminal in the guest (with -i: an interactive shell)')
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
        const term = process.env['TERM'];
        const env = o.tty && term && !o.env?.['TERM'] ? { TERM: term, ...o.env } : o.env;
        const req = {
          command: commandArgs(command),
          ...(env ? { env } : {}),
          ...(o.workdir ? { workdir: o.workdir } : {}),
          ...(o.interactive ? { stdin: true } : {}),
          ...(o.tty ? { tty: { rows: process.stdout.rows || 24, cols: process.stdout.columns || 80 } } : {}),
        };
        // Under -it our terminal goes raw: keys (Ctrl-C included) go to the guest's terminal,
        // which does the line editing and turns ^C into SIGINT there.
        const raw = o.tty && o.interactive && process.stdin.isTTY;
        let pumping: Promise<void> | undefined;
        const onResize = (): void => {
          if (execId) void api.resizeExec(ref, execId, { rows: process.stdout.rows, cols: process.stdout.columns }).catch(() => undefined);
        };
        try {
          if (raw) process.stdin.setRawMode(true);
          if (o.tty && process.stdout.isTTY) process.stdout.on('resize', onResize);
          for await (const ev of api.exec(ref, req)) {
            if (ev.type === 'started') {
              execId = ev.execId;
              if (o.interactive) pumping = pumpStdin(ref, ev.execId);
            } else if (ev.type === 'output') writeOutput(ev.stream, ev.data);
            else if (ev.type === 'exit') code = exitStatus(ev);
          }
        } finally {
          if (raw) process.stdin.setRawMode(false);
          process.stdout.off('resize', onResize);
        }
        process.stdin.destroy(); // the command is done: stop reading
        await pumping;
      } catch (err) {
        failCommand(err, 1);
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
