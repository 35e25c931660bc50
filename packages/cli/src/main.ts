#!/usr/bin/env -S node --
// (`node --`: Node 20 takes `--env-file FILE` anywhere in argv as its own flag, ours included.)
/** aegis: the command line over the aegisd API. */
import { Command } from 'commander';
import { infoCommand } from './commands/instance/info.js';
import {
  deleteCommand,
  extendCommand,
  pauseCommand,
  restartCommand,
  resumeCommand,
  stopCommand,
  hibernateCommand,
} from './commands/instance/lifecycle.js';
import { listCommand } from './commands/instance/list.js';
import { startCommand } from './commands/instance/start.js';
import { execCommand } from './commands/exec.js';
import { cpCommand } from './commands/cp.js';
import { mcpCommand } from './commands/mcp.js';
import { logsCommand } from './commands/logs.js';
import { eventsCommand } from './commands/events.js';
import { runCommand } from './commands/run.js';
import { secretCommand } from './commands/secret/secret.js';
import { imageCommand, imageListCommand, pullCommand } from './commands/image/image.js';
import { volumeCommand } from './commands/volume.js';
import { forkCommand, snapshotCommand } from './commands/snapshot.js';
import { egressCommand } from './commands/egress.js';
import { e2bCommand } from './commands/e2b.js';
import { uiCommand } from './commands/ui.js';
import { doctorCommand } from './commands/system/doctor.js';
import { downCommand, statusCommand, upCommand } from './commands/system/daemon.js';
import {
  dockerInspectCommand,
  dockerStartCommand,
  dockerStopCommand,
  killCommand,
  portCommand,
  psCommand,
  rmCommand,
  statsCommand,
  topCommand,
  unknownCommandLine,
  versionCommand,
  waitCommand,
} from './commands/docker.js';
import { ExitSignal, normalizeBoolFlags } from './util.js';

// `aegis logs x | head -1`: the reader went away, which is not an error (as with Docker).
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
}

const VERSION = '0.1.0';
const program = new Command('aegis')
  .description('Run untrusted workloads in throwaway microVMs')
  .version(VERSION)
  .enablePositionalOptions();

const instance = new Command('instance').description('manage instances (a VM running one command)').enablePositionalOptions();
for (const c of [
  startCommand(),
  listCommand(),
  infoCommand(),
  stopCommand(),
  deleteCommand(),
  pauseCommand(),
  resumeCommand(),
  hibernateCommand(),
  restartCommand(),
  extendCommand(),
]) {
  instance.addCommand(c);
}
program.addCommand(instance);
for (const c of [
  runCommand(),
  execCommand(),
  logsCommand(),
  eventsCommand(),
  secretCommand(),
  imageCommand(),
  volumeCommand(),
  snapshotCommand(),
  forkCommand(),
  egressCommand(),
  e2bCommand(),
  uiCommand(),
  upCommand(),
  downCommand(),
  statusCommand(),
  doctorCommand(),
  psCommand(),
  rmCommand(),
  dockerStopCommand(),
  dockerStartCommand(),
  killCommand(),
  dockerInspectCommand(),
  waitCommand(),
  topCommand(),
  statsCommand(),
  cpCommand(),
  mcpCommand(),
  // Docker's names for what `image …` and `instance …` do.
  pullCommand(),
  imageListCommand('images'),
  restartCommand(),
  pauseCommand(),
  resumeCommand('unpause'),
  hibernateCommand(),
  portCommand(),
  versionCommand(VERSION),
]) {
  program.addCommand(c);
}
// An unknown command: one line, Docker's verbs pointed to what does their job here.
program.on('command:*', (operands: string[]) => {
  const known = program.commands.flatMap((c) => [c.name(), ...c.aliases()]);
  process.stderr.write(`${unknownCommandLine(operands[0] ?? '', known)}\n`);
  process.exit(1);
});
program.addCommand((await import('./commands/completion.js')).completionCommand());

/**
 * Usage errors (an unknown flag, a bad value) read like every other error: one line, with the
 * flag named and a code. `run` exits 125 for them, as `docker run` does.
 */
function usageErrors(cmd: Command): void {
  cmd.configureOutput({
    // Commander's "(Did you mean …?)" comes on a line of its own: one line, always.
    outputError: (text, write) =>
      write(
        `aegis: ${text
          .trim()
          .replace(/^error: /, '')
          .replace(/\s*\n\s*/g, ' ')} [INVALID_ARGUMENT]\n`,
      ),
  });
  // A usage error is INVALID_ARGUMENT, which exits 2 wherever it is found (`fail`); `run`
  // keeps 125 for any error of Aegis, as docker run does.
  const usageStatus = cmd.name() === 'run' ? 125 : 2;
  cmd.exitOverride((err) => {
    // Returning lets commander exit with its own status (0 after --help or --version).
    if (err.exitCode !== 0) process.exit(usageStatus);
  });
  for (const sub of cmd.commands) usageErrors(sub);
}
usageErrors(program);

try {
  await program.parseAsync(normalizeBoolFlags(process.argv, ['--rm']));
} catch (err) {
  if (!(err instanceof ExitSignal)) throw err;
}
