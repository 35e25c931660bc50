import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, openSync, closeSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Command } from 'commander';
import { AegisClient, isAegisError, type Status } from '@aegis/client';
import { client, errorsAsJson, fail } from '../../util.js';

/** aegisd's entry point in this checkout (the CLI never imports daemon code). */
const DAEMON_MAIN = fileURLToPath(new URL('../../../../daemon/dist/main.js', import.meta.url));

/** Where `aegis up --e2b` serves E2B's API when no address is given (envd's own port number). */
const DEFAULT_E2B_ADDR = '127.0.0.1:49983';
/** Where `aegis up --ui` serves the dashboard when no address is given. */
const DEFAULT_UI_ADDR = '127.0.0.1:7777';

/** Waits for an address file the daemon writes once a TCP door listens (just after the socket). */
async function served(file: string, what: string, logFile: string): Promise<void> {
  for (let i = 0; i < 100 && !existsSync(file); i++) await new Promise((r) => setTimeout(r, 50));
  if (!existsSync(file)) throw new Error(`aegisd did not start the ${what}; see ${logFile}`);
}

async function running(api: AegisClient): Promise<number | undefined> {
  try {
    return (await api.status()).pid;
  } catch (err) {
    if (isAegisError(err, 'UNAVAILABLE')) return undefined;
    throw err;
  }
}

export function upCommand(): Command {
  return new Command('up')
    .description('start aegisd in the background')
    .option('--e2b [ADDR]', `also serve E2B's API on this loopback address (default ${DEFAULT_E2B_ADDR}); then eval "$(aegis e2b env)"`)
    .option('--ui [ADDR]', `also serve the dashboard on this loopback address (default ${DEFAULT_UI_ADDR}); then aegis ui`)
    .action(async (o: { e2b?: string | boolean; ui?: string | boolean }) => {
      try {
        const api = client();
        const pid = await running(api);
        if (pid !== undefined) {
          process.stdout.write(`aegisd is already running (pid ${pid})\n`);
          const serving = existsSync(path.join(path.dirname(api.socketPath), 'e2b.addr'));
          if (o.e2b !== undefined && !serving) process.stdout.write('to serve the E2B API, restart it: aegis down && aegis up --e2b\n');
          const showing = existsSync(path.join(path.dirname(api.socketPath), 'ui.addr'));
          if (o.ui !== undefined && !showing) process.stdout.write('to serve the dashboard, restart it: aegis down && aegis up --ui\n');
          return;
        }
        const e2bAddr = o.e2b === undefined ? undefined : o.e2b === true ? DEFAULT_E2B_ADDR : o.e2b;
        const home = path.dirname(api.socketPath);
        mkdirSync(home, { recursive: true, mode: 0o700 });
        const logFile = path.join(home, 'aegisd.log');
        const log = openSync(logFile, 'a', 0o600);
        const uiAddr = o.ui === undefined ? undefined : o.ui === true ? DEFAULT_UI_ADDR : o.ui;
        const env = {
          ...process.env,
          ...(typeof e2bAddr === 'string' ? { AEGIS_E2B_ADDR: e2bAddr } : {}),
          ...(typeof uiAddr === 'string' ? { AEGIS_UI_ADDR: uiAddr } : {}),
        };
        const child = spawn(process.execPath, [DAEMON_MAIN], { detached: true, stdio: ['ignore', log, log], env });
        closeSync(log);
        child.unref();
        const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
        const deadline = Date.now() + 20_000;
        for (;;) {
          const up = await running(api);
          if (up !== undefined) {
            process.stdout.write(`aegisd started (pid ${up}); log: ${logFile}\n`);
            if (e2bAddr !== undefined) {
              // The endpoint listens just after the socket: its address file says when (`aegis e2b env` reads it).
              await served(path.join(home, 'e2b.addr'), 'E2B endpoint', logFile);
              process.stdout.write('E2B API served; for a shell: eval "$(aegis e2b env)"\n');
            }
            if (uiAddr !== undefined) {
              await served(path.join(home, 'ui.addr'), 'dashboard', logFile);
              process.stdout.write('dashboard served; its URL: aegis ui\n');
            }
            return;
          }
          const code = await Promise.race([exited, new Promise<undefined>((r) => setTimeout(() => r(undefined), 100))]);
          if (code !== undefined) throw new Error(`aegisd exited with status ${code}; see ${logFile}`);
          if (Date.now() > deadline) throw new Error(`aegisd did not answer within 20 s; see ${logFile}`);
        }
      } catch (err) {
        fail(err);
      }
    });
}

export function downCommand(): Command {
  return new Command('down').description('stop aegisd (running VMs keep running; the next aegisd finds them)').action(async () => {
    try {
      const api = client();
      const pid = await running(api);
      if (pid === undefined) {
        process.stdout.write('aegisd is not running\n');
        return;
      }
      await api.shutdown();
      const deadline = Date.now() + 10_000;
      while ((await running(api)) !== undefined) {
        if (Date.now() > deadline) throw new Error('aegisd did not stop within 10 s');
        await new Promise((r) => setTimeout(r, 100));
      }
      process.stdout.write(`aegisd stopped (pid ${pid})\n`);
    } catch (err) {
      fail(err);
    }
  });
}

export function statusCommand(): Command {
  return new Command('status')
    .description('show whether aegisd runs, its backend and instance counts')
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const s = await client().status();
        if (o.json) {
          process.stdout.write(JSON.stringify(s, null, 2) + '\n');
          return;
        }
        process.stdout.write(
          `aegisd ${s.version} running (pid ${s.pid}, up ${Math.round(s.uptimeMs / 1000)}s)\n` +
            `home:      ${s.home}\n` +
            `backend:   ${s.backend.name} (${s.backend.detail})\n` +
            `accel:     ${s.backend.accelerationReason || s.backend.acceleration}\n` +
            `instances: ${s.instances.running} running, ${s.instances.total} total\n` +
            `pool:      ${poolLine(s.pool)}\n` +
            `loop lag:  p50 ${s.eventLoopDelayMs.p50Ms} ms, p99 ${s.eventLoopDelayMs.p99Ms} ms, max ${s.eventLoopDelayMs.maxMs} ms (last ${Math.round(s.eventLoopDelayMs.windowMs / 1000)} s)\n`,
        );
      } catch (err) {
        fail(err);
      }
    });
}

/** The warm pool in one line: how many ready, of which shapes, and how it has served. */
function poolLine(p: Status['pool']): string {
  if (!p) return 'off (AEGIS_POOL_SIZE=0, or no warm boot)';
  const shapes = p.shapes
    .map(
      (sh) =>
        `${sh.ready}/${p.size} ${sh.default ? 'default' : sh.image ? 'image' : 'other'} ${sh.memoryMiB} MiB ${sh.vcpuCount} vCPU ${sh.network}`,
    )
    .join(', ');
  return `${p.ready} ready${shapes ? ` (${shapes})` : ''}${p.filling ? ', filling' : ''}; ${p.taken} taken, ${p.missed} missed; budget ${p.memoryBudgetMiB} MiB`;
}
