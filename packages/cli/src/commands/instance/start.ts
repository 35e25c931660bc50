import { Command } from 'commander';
import type { CreateInstanceRequest } from '@aegis/client';
import { parseExpose } from '../../ports.js';
import { client, collectEnv, commandArgs, fail, integer } from '../../util.js';

export interface StartOptions {
  name?: string;
  env?: Record<string, string>;
  secret?: string[];
  expose?: NonNullable<CreateInstanceRequest['exposes']>;
  workdir?: string;
  memory?: number;
  cpus?: number;
}

/** Options shared by `instance start` and `run`. */
export function withStartOptions(cmd: Command): Command {
  return (
    cmd
      .option('--name <handle>', 'handle for the instance (unique)')
      .option('-e, --env <KEY=VALUE>', 'environment variable for the workload (repeatable)', collectEnv)
      .option(
        '--secret <KEY>',
        "put a stored secret in the workload's environment (repeatable; '*' for all)",
        (v: string, prev: string[] = []) => [...prev, v],
      )
      .option('-p, --expose <[IP:][HOST:]GUEST[/tcp]>', 'forward a host port to a guest port, as docker -p (repeatable)', parseExpose)
      .option('-w, --workdir <dir>', 'working directory in the guest')
      // Only the form is checked here; the range is the daemon's (its OpenAPI schema), so the
      // answer is the same coded error whichever client asks.
      .option('--memory <MiB>', 'guest memory in MiB, 128-65536 (default 512)', integer('--memory'))
      .option('--cpus <n>', 'virtual CPUs, 1-64 (default 1)', integer('--cpus'))
      .argument('<command...>', 'command to run in the VM (after --)')
      .passThroughOptions()
  );
}

export function createRequest(command: string[], o: StartOptions): CreateInstanceRequest {
  const req: CreateInstanceRequest = { command: commandArgs(command) };
  if (o.name !== undefined) req.handle = o.name;
  if (o.env !== undefined) req.env = o.env;
  if (o.secret !== undefined) req.secrets = o.secret;
  if (o.expose !== undefined) req.exposes = o.expose;
  if (o.workdir !== undefined) req.workdir = o.workdir;
  if (o.memory !== undefined) req.memoryMiB = o.memory;
  if (o.cpus !== undefined) req.vcpuCount = o.cpus;
  return req;
}

export function startCommand(): Command {
  return withStartOptions(new Command('start').description('start an instance in the background and print its handle')).action(
    async (command: string[], o: StartOptions) => {
      try {
        const inst = await client().createInstance(createRequest(command, o));
        process.stdout.write(`${inst.handle}\n`);
      } catch (err) {
        fail(err);
      }
    },
  );
}
