import { Command } from 'commander';
import { AegisClient, AegisError } from '@aegis/client';
import { createRequest, startDetached, withStartOptions, type StartOptions } from './instance/start.js';
import { ensureImage } from './image/image.js';
import { checkTty, describeEnd, errorsAsJson, exit, failCommand, writeOutput } from '../util.js';
import { pumpStdin, terminal } from './exec.js';

interface RunOptions extends StartOptions {
  rm?: boolean;
  detach?: boolean;
  interactive?: boolean;
  tty?: boolean;
}

/**
 * start + follow the output + delete, exiting with the workload's exit code. One streaming
 * request (POST /v1/run): the daemon deletes the instance when it ends, and also when this
 * process goes away without a word (SIGKILL, a dropped connection), so nothing is left behind.
 */
export function runCommand(): Command {
  return withStartOptions(new Command('run').description('run a command in a new VM, stream its output, then delete the VM'))
    .option('-i, --interactive', "pass our stdin to the workload's stdin")
    .option('-t, --tty', 'run the workload on a terminal in the guest (-it: an interactive shell)')
    .option('-d, --detach', 'start it in the background and print its handle (kept until aegis rm)')
    .option('--rm', 'delete the instance afterwards (the default; --rm=false keeps it)')
    .option('--no-rm', 'keep the instance afterwards')
    .option('--json', 'with -d: print the instance as JSON')
    .action(async (command: string[], o: RunOptions, cmd: Command) => {
      errorsAsJson(o.json);
      const explicitRm = cmd.getOptionValueSource('rm') === 'cli' && o.rm !== false;
      try {
        checkTty(o);
        if (o.detach) {
          if (explicitRm) throw new AegisError('INVALID_ARGUMENT', '--rm with -d is not supported yet: delete it with aegis rm when done');
          await startDetached(command, o, o.interactive || o.tty ? stdio(o) : {});
          return;
        }
      } catch (err) {
        failCommand(err);
      }
      exit(await attached(command, o));
    });
}

function stdio(o: RunOptions): { stdin?: boolean; tty?: { rows: number; cols: number } } {
  return {
    ...(o.interactive ? { stdin: true } : {}),
    ...(o.tty ? { tty: { rows: process.stdout.rows || 24, cols: process.stdout.columns || 80 } } : {}),
  };
}

async function attached(command: string[], o: RunOptions): Promise<number> {
  const api = new AegisClient();
  const remove = o.rm !== false;
  const abort = new AbortController();
  let handle: string | undefined;
  let interrupts = 0;
  // First Ctrl-C: SIGINT to the workload (it may clean up and exit as it likes).
  // Second: stop the instance. Either way it is then deleted, so nothing is left.
  const onSigint = (): void => {
    interrupts++;
    if (!handle || interrupts > 2) process.exit(130);
    if (interrupts === 1) void api.signalInstance(handle, 'SIGINT').catch(() => undefined);
    else void api.stopInstance(handle, { timeoutMs: 2000 }).catch(() => undefined);
  };
  process.on('SIGINT', onSigint);
  // A closed terminal or a supervisor's SIGTERM: dropping the stream is enough (the daemon
  // deletes the instance); deleting it ourselves first means it is gone when we exit.
  for (const [sig, status] of [
    ['SIGTERM', 143],
    ['SIGHUP', 129],
  ] as const) {
    process.on(sig, () => {
      const h = handle;
      abort.abort();
      if (!h || !remove) process.exit(status);
      void api
        .deleteInstance(h, { force: true })
        .catch(() => undefined)
        .finally(() => process.exit(status));
    });
  }
  const term = o.tty ? terminal(o.interactive === true, (size) => handle && api.resizeInstance(handle, size)) : undefined;
  let code = 125;
  let pumping: Promise<void> | undefined;
  try {
    const req = { ...createRequest(command, o), ...stdio(o), ...(remove ? { autoRemove: true } : {}) };
    const termEnv = o.tty && process.env['TERM'] && !req.env?.['TERM'] ? { TERM: process.env['TERM'] } : undefined;
    if (termEnv) req.env = { ...termEnv, ...req.env };
    if (req.image !== undefined) await ensureImage(req.image, false);
    term?.start();
    for await (const ev of api.run(req, abort.signal)) {
      if (ev.type === 'created') {
        handle = ev.instance.id;
        if (o.interactive) pumping = pumpStdin((input) => api.instanceInput(ev.instance.id, input));
      } else if (ev.type === 'output') writeOutput(ev.stream, ev.data);
      else if (ev.type === 'end') code = describeEnd(ev);
    }
    if (interrupts > 1) code = 130;
  } catch (err) {
    term?.stop();
    if (handle && remove) await api.deleteInstance(handle, { force: true }).catch(() => undefined);
    failCommand(err);
  } finally {
    term?.stop();
  }
  process.stdin.destroy(); // the workload is done: stop reading
  await pumping;
  return code;
}
