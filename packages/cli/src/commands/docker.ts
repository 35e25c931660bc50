/**
 * The verbs a Docker user types without thinking, at the top level: `ps`, `rm`, `stop`,
 * `start`, `kill`, `inspect`, `wait`, `top`. They are the `instance …` commands under Docker's names and
 * flags; where Docker goes on after a failed name (`rm a b` with `a` missing still removes
 * `b`), so do they, and they exit non-zero at the end.
 */
import { Command } from 'commander';
import { client, eachRef, errorsAsJson, exit, fail, forEach, formatBytes, table } from '../util.js';
import { listCommand } from './instance/list.js';
import { deleteCommand, stopCommand } from './instance/lifecycle.js';

export function psCommand(): Command {
  return listCommand('ps');
}

export function rmCommand(): Command {
  return deleteCommand('rm');
}

export function dockerStopCommand(): Command {
  return stopCommand();
}

export function dockerStartCommand(): Command {
  return new Command('start')
    .description('start stopped instances again (docker start): same command, env, secrets, image, ports, files')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .action((refs: string[]) =>
      forEach(refs, async (ref) => {
        const api = client();
        const i = await api.getInstance(ref);
        // Like docker start: one that runs already is left alone.
        if (i.state === 'running' || i.state === 'paused' || i.state === 'starting') return i.handle;
        return (await api.restartInstance(ref)).handle;
      }),
    );
}

export function killCommand(): Command {
  return new Command('kill')
    .description('send a signal to the workload of running instances (docker kill; default SIGKILL)')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('-s, --signal <signal>', 'signal name, e.g. SIGTERM or HUP', 'SIGKILL')
    .action((refs: string[], o: { signal: string }) => {
      const sig = o.signal.toUpperCase().startsWith('SIG') ? o.signal.toUpperCase() : `SIG${o.signal.toUpperCase()}`;
      return forEach(refs, async (ref) => {
        await client().signalInstance(ref, sig);
        return ref;
      });
    });
}

export function dockerInspectCommand(): Command {
  return new Command('inspect')
    .description('print instances as JSON (docker inspect)')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .action(async (refs: string[]) => {
      const { results, failed } = await eachRef(refs, (ref) => client().getInstance(ref));
      process.stdout.write(JSON.stringify(results, null, 2) + '\n');
      if (failed) exit(1);
    });
}

export function waitCommand(): Command {
  return new Command('wait')
    .description("block until instances stop, then print each one's exit code (docker wait)")
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('--json', 'print {state, exitCode, stateReason} per instance, one JSON line each')
    .action((refs: string[], o: { json?: boolean }) =>
      forEach(refs, async (ref) => {
        const end = await client().waitInstance(ref);
        if (o.json) return JSON.stringify(end);
        // No status (a VM that died, a failed start): Docker's -1, and why on stderr.
        if (end.exitCode === null) process.stderr.write(`aegis: ${ref} ${end.state}${end.stateReason ? `: ${end.stateReason}` : ''}\n`);
        return String(end.exitCode ?? -1);
      }),
    );
}

const cpuTime = (ms: number): string => {
  const s = Math.floor(ms / 1000);
  return `${String(Math.floor(s / 3600)).padStart(2, '0')}:${String(Math.floor(s / 60) % 60).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}`;
};

export function topCommand(): Command {
  return new Command('top')
    .description("the instance's guest processes (docker top)")
    .argument('<instance>', 'handle, id or id prefix')
    .option('--json', 'print JSON')
    .action(async (ref: string, o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const top = await client().topInstance(ref);
        if (o.json) {
          process.stdout.write(JSON.stringify(top, null, 2) + '\n');
          return;
        }
        const rows = [['UID', 'PID', 'PPID', 'STAT', 'RSS', 'TIME', 'CMD']];
        for (const p of top.processes) {
          rows.push([String(p.uid), String(p.pid), String(p.ppid), p.state, `${p.rssKiB}K`, cpuTime(p.cpuMs), p.command]);
        }
        process.stdout.write(table(rows));
        if (top.truncated) process.stderr.write(`aegis: only the first ${top.processes.length} processes are shown\n`);
      } catch (err) {
        fail(err);
      }
    });
}

const size = (n: number | null): string => (n === null ? '--' : formatBytes(n));

export function statsCommand(): Command {
  return new Command('stats')
    .description('what instances use, refreshed every 2 s like docker stats (all running ones when none is named)')
    .argument('[instance...]', 'handles, ids or id prefixes')
    .option('--no-stream', 'print once and exit')
    .option('--json', 'JSON: an array per refresh (one line each when streaming)')
    .action(async (refs: string[], o: { stream: boolean; json?: boolean }) => {
      errorsAsJson(o.json);
      const api = client();
      try {
        for (;;) {
          const names =
            refs.length > 0
              ? refs
              : (await api.listInstances()).filter((i) => i.state === 'running' || i.state === 'paused').map((i) => i.id);
          const { results, failed } = await eachRef(names, (ref) => api.instanceStats(ref));
          if (o.json) process.stdout.write(JSON.stringify(results, null, o.stream ? undefined : 2) + '\n');
          else {
            const rows = [['NAME', 'ID', 'CPU %', 'MEM USAGE / LIMIT', 'MEM %', 'VMM MEM', 'DISK', 'PIDS']];
            for (const s of results) {
              const pct =
                s.guestMemoryUsedBytes !== null && s.guestMemoryTotalBytes
                  ? `${((s.guestMemoryUsedBytes / s.guestMemoryTotalBytes) * 100).toFixed(1)}%`
                  : '--';
              // Paused ones say so (docker stats does not; a VM that is paused for idleness costs no CPU).
              const name = s.idlePaused ? `${s.handle} (idle)` : s.state === 'paused' ? `${s.handle} (paused)` : s.handle;
              rows.push([
                name,
                s.id.slice(0, 12),
                s.cpuPercent === null ? '--' : `${s.cpuPercent.toFixed(1)}%`,
                `${size(s.guestMemoryUsedBytes)} / ${size(s.memoryLimitBytes)}`,
                pct,
                size(s.vmmMemoryBytes),
                size(s.diskUsedBytes),
                s.processes === null ? '--' : String(s.processes),
              ]);
            }
            // A terminal is redrawn in place; a pipe gets one table after another.
            if (o.stream && process.stdout.isTTY) process.stdout.write('\x1b[H\x1b[2J');
            process.stdout.write(table(rows));
          }
          if (!o.stream) {
            if (failed) exit(1);
            return;
          }
          await new Promise((r) => setTimeout(r, 2000));
        }
      } catch (err) {
        fail(err);
      }
    });
}
