import { Command, InvalidArgumentError } from 'commander';
import { AegisError, type CreateInstanceRequest, type NetworkMode } from '@aegis/client';
import { parseExpose } from '../../ports.js';
import { parseVolume } from '../../volumes.js';
import {
  absolutePath,
  parseDuration,
  client,
  collectEnv,
  collectEnvFile,
  commandArgs,
  errorsAsJson,
  fail,
  parseMemory,
  parseUser,
  positiveInt,
} from '../../util.js';
import { ensureImage } from '../image/image.js';

/** Docker's `--label k=v` (a bare `k` is an empty value). */
function collectLabel(v: string, previous: Record<string, string> = {}): Record<string, string> {
  const eq = v.indexOf('=');
  const key = eq < 0 ? v : v.slice(0, eq);
  if (!/^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$/.test(key))
    throw new InvalidArgumentError(`"${key}" is not a label key (letters, digits, . _ / -)`);
  return { ...previous, [key]: eq < 0 ? '' : v.slice(eq + 1) };
}

export interface StartOptions {
  name?: string;
  env?: Record<string, string>;
  envFile?: Record<string, string>;
  user?: string;
  label?: Record<string, string>;
  timeout?: number;
  idlePause?: number;
  idleHibernate?: number;
  json?: boolean;
  secret?: string[];
  expose?: NonNullable<CreateInstanceRequest['exposes']>;
  workdir?: string;
  memory?: number;
  cpus?: number;
  network?: NetworkMode;
  egressAllow?: string[];
  egressDeny?: string[];
  image?: string;
  volume?: NonNullable<CreateInstanceRequest['volumes']>;
}

/** --idle-pause: a duration of at least 1 s, or 0 for never (the daemon checks the same). */
function parseIdlePause(v: string): number {
  const ms = parseDuration(v);
  if (ms !== 0 && ms < 1000) throw new InvalidArgumentError(`"${v}" is too short: at least 1s (or 0 for never)`);
  return ms;
}

function parseNetwork(v: string): NetworkMode {
  if (v === 'user' || v === 'none' || v === 'unfiltered') return v;
  throw new InvalidArgumentError(
    `"${v}": expected user (the default: outbound TCP and DNS under the egress policy), none (lo only) or unfiltered (no policy)`,
  );
}

const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

/** Options shared by `instance start` and `run`. */
export function withStartOptions(cmd: Command): Command {
  return cmd
    .option('--name <handle>', 'handle for the instance (unique)')
    .option('-e, --env <KEY=VALUE>', 'environment variable for the workload (repeatable; KEY alone takes ours)', collectEnv)
    .option('--env-file <FILE>', 'read KEY=VALUE lines from a file, as docker does (repeatable; -e wins)', collectEnvFile)
    .option(
      '--secret <KEY>',
      "put a stored secret in the workload's environment (repeatable; '*' for all)",
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('-p, --expose <[IP:][HOST:]GUEST[/tcp]>', 'forward a host port to a guest port, as docker -p (repeatable)', parseExpose)
    .option(
      '-v, --volume <HOST:GUEST[:ro]|NAME:GUEST[:ro]>',
      'a host directory (absolute or ./relative) or a named volume (created if missing) at GUEST (repeatable)',
      parseVolume,
    )
    .option(
      '--network <mode>',
      "'user' (default: outbound TCP and DNS under the egress policy: public addresses only unless allowed), 'none' (lo only), " +
        "or 'unfiltered' (every address the host reaches, UDP too: no policy)",
      parseNetwork,
    )
    .option(
      '--egress-allow <PATTERN>',
      'allow only these destinations (repeatable): a name (pypi.org), *.suffix, IP or CIDR, with an optional :PORT; ' +
        'an address or name given here may be private (a LAN model server)',
      collect,
    )
    .option('--egress-deny <PATTERN>', 'never these destinations (repeatable; wins over --egress-allow)', collect)
    .option('--image <REF>', 'run in this OCI image (pulled if missing); the command then replaces its Cmd and may be omitted')
    .option('-w, --workdir <dir>', 'working directory in the guest (created if missing)', absolutePath)
    .option('--timeout <duration>', 'stop it (SIGTERM, then the VM) this long after it starts: 90s, 10m, 2h; 0 for none', parseDuration)
    .option(
      '--idle-pause <duration>',
      'pause it after this long with no exec, output, files call or traffic on its ports (30s, 5m, 1h, 1500ms; at least 1s); ' +
        "the next exec, logs -f, cp or connection wakes it; 0 for never (default: aegisd's AEGIS_IDLE_PAUSE)",
      parseIdlePause,
    )
    .option(
      '--idle-hibernate <duration>',
      'hibernate it (memory to disk, no VM process) after this long unused, counted as --idle-pause counts (after the pause, when both are given); the same uses wake it; 0 for never',
      parseIdlePause,
    )
    .option('-l, --label <KEY=VALUE>', 'a label to find and filter it by (repeatable)', collectLabel)
    .option('-u, --user <NAME|UID[:GROUP|GID]>', "run the workload as this user (default: the image's, else root)", parseUser)
    .option('-m, --memory <size>', 'guest memory: 512m, 1g, or MiB (128m-64g, default 512m)', parseMemory)
    .option('--cpus <n>', 'virtual CPUs, 1-64 (default 1)', positiveInt('--cpus', 1, 64))
    .argument('[command...]', 'command to run in the VM (after --); optional with --image')
    .passThroughOptions();
}

export function createRequest(command: string[], o: StartOptions): CreateInstanceRequest {
  const argv = commandArgs(command);
  if (argv.length === 0 && o.image === undefined) throw new AegisError('INVALID_ARGUMENT', 'give a command to run after --, or an --image');
  const req: CreateInstanceRequest = argv.length > 0 ? { command: argv } : {};
  if (o.image !== undefined) req.image = o.image;
  if (o.name !== undefined) req.handle = o.name;
  if (o.env !== undefined || o.envFile !== undefined) req.env = { ...o.envFile, ...o.env };
  if (o.user !== undefined) req.user = o.user;
  if (o.label !== undefined) req.labels = o.label;
  if (o.timeout !== undefined) req.timeoutMs = o.timeout;
  if (o.idlePause !== undefined) req.idlePauseMs = o.idlePause;
  if (o.idleHibernate !== undefined) req.idleHibernateMs = o.idleHibernate;
  if (o.secret !== undefined) req.secrets = o.secret;
  if (o.expose !== undefined) req.exposes = o.expose;
  if (o.workdir !== undefined) req.workdir = o.workdir;
  if (o.memory !== undefined) req.memoryMiB = o.memory;
  if (o.cpus !== undefined) req.vcpuCount = o.cpus;
  if (o.network !== undefined) req.network = o.network;
  if (o.egressAllow !== undefined || o.egressDeny !== undefined) req.egress = { allow: o.egressAllow ?? [], deny: o.egressDeny ?? [] };
  if (o.volume !== undefined) req.volumes = o.volume;
  return req;
}

/** Creates the instance in the background; prints its handle, or with --json the instance. */
export async function startDetached(command: string[], o: StartOptions, extra: Partial<CreateInstanceRequest> = {}): Promise<void> {
  errorsAsJson(o.json);
  const req = { ...createRequest(command, o), ...extra };
  if (req.image !== undefined) await ensureImage(req.image, o.json === true);
  const inst = await client().createInstance(req);
  process.stdout.write(o.json ? `${JSON.stringify(inst, null, 2)}\n` : `${inst.handle}\n`);
}

export function startCommand(): Command {
  return withStartOptions(
    new Command('start').description(
      'start an instance in the background and print its handle (or boot a stopped one again: instance start NAME)',
    ),
  )
    .option('--json', 'print the instance as JSON')
    .option('--snapshot <NAME>', 'resume this snapshot as a new instance (its processes carry on; a fresh identity, disk and ports)')
    .action(async (command: string[], o: StartOptions & { snapshot?: string }) => {
      try {
        if (o.snapshot !== undefined) {
          if (commandArgs(command).length > 0) {
            throw new AegisError(
              'INVALID_ARGUMENT',
              'an instance started from a snapshot runs what the snapshot was running: leave out the command',
            );
          }
          // Only what may differ from the snapshot's machine; the daemon refuses the rest by name.
          const given = createRequest(['true'], o);
          delete given.command;
          errorsAsJson(o.json);
          const inst = await client().createInstance({ ...given, snapshot: o.snapshot });
          process.stdout.write(o.json ? `${JSON.stringify(inst, null, 2)}\n` : `${inst.handle}\n`);
          return;
        }
        // `instance stop web` then `instance start web`: the README's own sequence. Without `--`,
        // a first word naming an instance means that instance, never a new one running `web`.
        const first = command[0];
        if (!process.argv.includes('--') && first !== undefined && o.image === undefined) {
          const existing = await client()
            .getInstance(first)
            .catch(() => undefined);
          if (existing) {
            if (command.length > 1) {
              throw new AegisError(
                'INVALID_ARGUMENT',
                `"${first}" is an instance: aegis start ${first} boots it again; to run a command named ${first}, put it after --`,
              );
            }
            const again = existing.state === 'stopped' || existing.state === 'failed' ? await client().restartInstance(first) : existing;
            process.stdout.write(o.json ? `${JSON.stringify(again, null, 2)}\n` : `${again.handle}\n`);
            return;
          }
        }
        await startDetached(command, o);
      } catch (err) {
        fail(err);
      }
    });
}
