import { Command, InvalidArgumentError } from 'commander';
import { AegisError, type CreateInstanceRequest, type NetworkMode } from '@aegis/client';
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
  network?: NetworkMode;
  image?: string;
}

function parseNetwork(v: string): NetworkMode {
  if (v === 'user' || v === 'none') return v;
  throw new InvalidArgumentError(`"${v}": expected user (outbound network, the default) or none (no network device)`);
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
      .option('--network <mode>', "'user' (default: outbound TCP/UDP and DNS, host loopback unreachable) or 'none'", parseNetwork)
      .option('--image <REF>', 'run in this OCI image (pulled if missing); the command then replaces its Cmd and may be omitted')
      .option('-w, --workdir <dir>', 'working directory in the guest')
      // Only the form is checked here; the range is the daemon's (its OpenAPI schema), so the
      // answer is the same coded error whichever client asks.
      .option('--memory <MiB>', 'guest memory in MiB, 128-65536 (default 512)', integer('--memory'))
      .option('--cpus <n>', 'virtual CPUs, 1-64 (default 1)', integer('--cpus'))
      .argument('[command...]', 'command to run in the VM (after --); optional with --image')
      .passThroughOptions()
  );
}

export function createRequest(command: string[], o: StartOptions): CreateInstanceRequest {
  const argv = commandArgs(command);
  if (argv.length === 0 && o.image === undefined) throw new AegisError('INVALID_ARGUMENT', 'give a command to run after --, or an --image');
  const req: CreateInstanceRequest = argv.length > 0 ? { command: argv } : {};
  if (o.image !== undefined) req.image = o.image;
  if (o.name !== undefined) req.handle = o.name;
  if (o.env !== undefined) req.env = o.env;
  if (o.secret !== undefined) req.secrets = o.secret;
  if (o.expose !== undefined) req.exposes = o.expose;
  if (o.workdir !== undefined) req.workdir = o.workdir;
  if (o.memory !== undefined) req.memoryMiB = o.memory;
  if (o.cpus !== undefined) req.vcpuCount = o.cpus;
  if (o.network !== undefined) req.network = o.network;
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
