import { Command } from 'commander';
import { AegisError, exitStatus } from '@aegis/protocol';
import {
  absolutePath,
  checkTty,
  client,
  collectEnv,
  collectEnvFile,
  commandArgs,
  exit,
  fail,
  failCommand,
  parseUser,
  writeOutput,
} from '../util.js';

interface ExecOptions {
  env?: Record<string, string>;
  envFile?: Record<string, string>;
  workdir?: string;
  user?: string;
  interactive?: boolean;
  tty?: boolean;
  detach?: boolean;
}

export function execCommand(): Command {
  return new Command('exec')
    .description('run a command in a running instance')
    .option('-i, --interactive', 'pass our stdin to the command')
    .option('-t, --tty', 'run the command on a terminal in the guest (with -i: an interactive shell)')
    .option('-d, --detach', 'run it in the background and print its exec id (output: aegis logs --execs)')
    .option('-e, --env <KEY=VALUE>', 'environment variable (repeatable)', collectEnv)
    .option('--env-file <FILE>', 'read KEY=VALUE lines from a file (repeatable; -e wins)', collectEnvFile)
    .option('-w, --workdir <dir>', 'working directory in the guest (created if missing)', absolutePath)
    .option('-u, --user <NAME|UID[:GROUP|GID]>', 'run the command as this user', parseUser)
    .argument('<instance>', 'handle, id or id prefix')
    .argument('<command...>', 'command to run (after --)')
    .passThroughOptions()
    .action(async (ref: string, command: string[], o: ExecOptions) => {
      const api = client();
      if (o.detach) return detached(ref, command, o);
      let code = 1;
      let execId: string | undefined;
      let interrupts = 0;
      // Ctrl-C goes to the command in the guest, as it would to a local one.
      const onSigint = (): void => {
        if (!execId || ++interrupts > 2) process.exit(130);
        void api.signalExec(ref, execId, interrupts === 1 ? 'SIGINT' : 'SIGKILL').catch(() => undefined);
      };
      process.on('SIGINT', onSigint);
      // Killed or hung up: our connection drops and the daemon kills the command's process group.
      const term = o.tty ? terminal(o.interactive === true, (size) => execId && api.resizeExec(ref, execId, size)) : undefined;
      try {
        checkTty(o);
        const termVar = process.env['TERM'];
        const given = o.env || o.envFile ? { ...o.envFile, ...o.env } : undefined;
        const env = o.tty && termVar && !given?.['TERM'] ? { TERM: termVar, ...given } : given;
        const req = {
          command: commandArgs(command),
          ...(env ? { env } : {}),
          ...(o.workdir ? { workdir: o.workdir } : {}),
          ...(o.user ? { user: o.user } : {}),
          ...(o.interactive ? { stdin: true } : {}),
          ...(o.tty ? { tty: { rows: process.stdout.rows || 24, cols: process.stdout.columns || 80 } } : {}),
        };
        let pumping: Promise<void> | undefined;
        term?.start();
        try {
          for await (const ev of api.exec(ref, req)) {
            if (ev.type === 'started') {
              execId = ev.execId;
              const id = ev.execId;
              if (o.interactive) pumping = pumpStdin((input) => api.execInput(ref, id, input));
            } else if (ev.type === 'output') writeOutput(ev.stream, ev.data);
            else if (ev.type === 'exit') code = exitStatus(ev);
          }
        } finally {
          term?.stop();
        }
        process.stdin.destroy(); // the command is done: stop reading
        await pumping;
      } catch (err) {
        failCommand(err, 1);
      }
      exit(code);
    });
}

/** docker exec -d: started, its id printed, and nothing waits for it. */
async function detached(ref: string, command: string[], o: ExecOptions): Promise<void> {
  if (o.interactive || o.tty) fail(new AegisError('INVALID_ARGUMENT', '-d runs the command with nobody attached: leave out -i and -t'));
  try {
    const given = o.env || o.envFile ? { ...o.envFile, ...o.env } : undefined;
    const { execId } = await client().execDetached(ref, {
      command: commandArgs(command),
      ...(given ? { env: given } : {}),
      ...(o.workdir ? { workdir: o.workdir } : {}),
      ...(o.user ? { user: o.user } : {}),
    });
    process.stdout.write(`${execId}\n`);
  } catch (err) {
    failCommand(err, 1);
  }
}

type Input = { data?: Buffer; eof?: boolean };

/** Copies our stdin to the guest process, one request per chunk, then closes it. */
export async function pumpStdin(send: (input: Input) => Promise<void>): Promise<void> {
  try {
    for await (const chunk of process.stdin as AsyncIterable<Buffer>) await send({ data: chunk });
    await send({ eof: true });
  } catch {
    // The process ended first: what it did not read is dropped, as with a closed pipe.
  }
}

/**
 * Our side of a guest terminal. Under -it our terminal goes raw: keys (Ctrl-C included) go to
 * the guest's terminal, which does the line editing and turns ^C into SIGINT there. Size
 * changes follow our window.
 */
export function terminal(
  interactive: boolean,
  resize: (size: { rows: number; cols: number }) => unknown,
): { start: () => void; stop: () => void } {
  const raw = interactive && process.stdin.isTTY;
  const onResize = (): void => {
    const r = resize({ rows: process.stdout.rows, cols: process.stdout.columns });
    if (r instanceof Promise) r.catch(() => undefined);
  };
  let started = false;
  return {
    start: () => {
      started = true;
      if (raw) process.stdin.setRawMode(true);
      if (process.stdout.isTTY) process.stdout.on('resize', onResize);
    },
    stop: () => {
      if (!started) return;
      started = false;
      if (raw) process.stdin.setRawMode(false);
      process.stdout.off('resize', onResize);
    },
  };
}
