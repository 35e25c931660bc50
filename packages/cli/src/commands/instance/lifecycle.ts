import { Command, Option } from 'commander';
import { client, fail, forEach, parseDuration, positiveInt } from '../../util.js';

/** `instance stop` and Docker's `stop`: every name is tried, failures reported, exit 1 if any. */
export function stopCommand(): Command {
  return new Command('stop')
    .description('stop instances: SIGTERM to the workload, SIGKILL after the timeout, VM powered off')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('-t, --timeout <seconds>', 'seconds before SIGKILL (default 10)', positiveInt('--timeout', 0, 600))
    .addOption(new Option('--time <seconds>', 'the older name of --timeout').hideHelp().argParser(positiveInt('--time', 0, 600)))
    .action((refs: string[], o: { timeout?: number; time?: number }) => {
      const seconds = o.timeout ?? o.time;
      return forEach(
        refs,
        async (ref) => (await client().stopInstance(ref, seconds === undefined ? {} : { timeoutMs: seconds * 1000 })).handle,
      );
    });
}

/** `instance delete` and Docker's `rm`: as `stop`, every name is tried. */
export function deleteCommand(name: 'delete' | 'rm' = 'delete'): Command {
  const c = new Command(name);
  if (name === 'delete') c.alias('rm');
  return c
    .description('delete stopped instances and all their files; -f stops running ones first')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('-f, --force', 'stop it first if it is running')
    .action((refs: string[], o: { force?: boolean }) =>
      forEach(refs, async (ref) => {
        await client().deleteInstance(ref, { force: o.force === true });
        return ref;
      }),
    );
}

export function pauseCommand(): Command {
  return new Command('pause')
    .description('freeze the guest (it stops executing)')
    .argument('<instance>', 'handle, id or id prefix')
    .action(async (ref: string) => {
      try {
        process.stdout.write(`${(await client().pauseInstance(ref)).handle}\n`);
      } catch (err) {
        fail(err);
      }
    });
}

export function hibernateCommand(): Command {
  return new Command('hibernate')
    .description(
      'save the machine to disk and end its VM (no memory, no process); its ports stay; any use (exec, cp, logs -f, a connection, resume) wakes it where it was',
    )
    .argument('<instance...>', 'handles, ids or id prefixes')
    .action((refs: string[]) =>
      forEach(refs, async (ref) => {
        return (await client().hibernateInstance(ref)).handle;
      }),
    );
}

/** `resume`, and Docker's `unpause`. */
export function resumeCommand(name: 'resume' | 'unpause' = 'resume'): Command {
  return new Command(name)
    .description('continue a paused guest, or wake a hibernated one')
    .argument('<instance>', 'handle, id or id prefix')
    .action(async (ref: string) => {
      try {
        process.stdout.write(`${(await client().resumeInstance(ref)).handle}\n`);
      } catch (err) {
        fail(err);
      }
    });
}

export function restartCommand(): Command {
  return new Command('restart')
    .description('stop the instance if it runs, then boot it again: same command, env, secrets, image and host ports, its files kept')
    .argument('<instance>', 'handle, id or id prefix')
    .action(async (ref: string) => {
      try {
        process.stdout.write(`${(await client().restartInstance(ref)).handle}\n`);
      } catch (err) {
        fail(err);
      }
    });
}

export function extendCommand(): Command {
  return new Command('extend')
    .description("set a running instance's deadline anew: DURATION from now (90s, 10m, 2h; 0 removes it)")
    .argument('<instance>', 'handle, id or id prefix')
    .argument('<duration>', 'how long from now', parseDuration)
    .action(async (ref: string, timeoutMs: number) => {
      try {
        const i = await client().setDeadline(ref, timeoutMs);
        process.stdout.write(`${i.handle}${i.deadline ? ` until ${i.deadline}` : ': no deadline'}\n`);
      } catch (err) {
        fail(err);
      }
    });
}
