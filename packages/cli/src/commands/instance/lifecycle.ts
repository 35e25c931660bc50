import { Command } from 'commander';
import { client, fail, positiveInt } from '../../util.js';

export function stopCommand(): Command {
  return new Command('stop')
    .description('stop an instance: SIGTERM to the workload, SIGKILL after the timeout, VM powered off')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('-t, --timeout <seconds>', 'seconds before SIGKILL (default 10)', positiveInt('--timeout', 0, 600))
    .action(async (refs: string[], o: { timeout?: number }) => {
      try {
        for (const ref of refs) {
          const i = await client().stopInstance(ref, o.timeout === undefined ? {} : { timeoutMs: o.timeout * 1000 });
          process.stdout.write(`${i.handle}\n`);
        }
      } catch (err) {
        fail(err);
      }
    });
}

export function deleteCommand(): Command {
  return new Command('delete')
    .alias('rm')
    .description('delete a stopped instance and all its files')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('-f, --force', 'stop it first if it is running')
    .action(async (refs: string[], o: { force?: boolean }) => {
      try {
        for (const ref of refs) {
          await client().deleteInstance(ref, { force: o.force === true });
          process.stdout.write(`${ref}\n`);
        }
      } catch (err) {
        fail(err);
      }
    });
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

export function resumeCommand(): Command {
  return new Command('resume')
    .description('continue a paused guest')
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
