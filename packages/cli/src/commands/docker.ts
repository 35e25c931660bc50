/**
 * The verbs a Docker user types without thinking, at the top level: `ps`, `rm`, `stop`,
 * `start`, `kill`, `inspect`, `wait`, `top`. They are the `instance …` commands under Docker's names and
 * flags; where Docker goes on after a failed name (`rm a b` with `a` missing still removes
 * `b`), so do they, and they exit non-zero at the end.
 */
import { Command } from 'commander';
import { AegisError, type Instance } from '@aegis/client';
import { parseTemplate, type Template } from '../format.js';
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

/** The fields of `docker inspect` that scripts read, under Docker's names, for `-f`. */
function dockerInspectView(i: Instance): Record<string, unknown> {
  return {
    Id: i.id,
    Name: i.handle,
    Created: i.createdAt,
    Path: i.command[0],
    Args: i.command.slice(1),
    Image: i.imageDigest ?? i.image,
    State: {
      Status: i.state,
      Running: i.state === 'running',
      Paused: i.state === 'paused',
      ExitCode: i.exitCode,
      StartedAt: i.startedAt,
      FinishedAt: i.stoppedAt,
      Error: i.stateReason,
    },
    Config: { Image: i.image, Cmd: i.command, Labels: i.labels ?? {}, User: i.user, WorkingDir: i.workdir },
    HostConfig: { Memory: i.memoryMiB * 1024 * 1024, NanoCpus: i.vcpuCount * 1e9, NetworkMode: i.network },
  };
}

export function dockerInspectCommand(): Command {
  return new Command('inspect')
    .description('print instances as JSON (docker inspect)')
    .argument('<instance...>', 'handles, ids or id prefixes')
    .option('--json', 'print JSON (the default, as docker inspect)')
    .option(
      '-f, --format <TEMPLATE>',
      "one line per instance from a Go-template subset: our fields ({{.state}}, {{.exitCode}}, {{json .ports}}) or Docker's ({{.State.Status}}, {{.State.ExitCode}}, {{.Id}}, {{.Name}}, {{.Config.Image}}, {{json .Config.Labels}})",
      (t: string) => parseTemplate(t),
    )
    .action(async (refs: string[], o: { format?: Template }) => {
      const { results, failed } = await eachRef(refs, (ref) => client().getInstance(ref));
      const t = o.format;
      if (t) process.stdout.write(results.map((i) => `${t.render({ ...dockerInspectView(i), ...i })}\n`).join(''));
      else process.stdout.write(JSON.stringify(results, null, 2) + '\n');
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
          // An instance named that cannot be measured (stopped, gone) ends it at once: a stream
          // would print the same error every 2 s forever.
          if (!o.stream || (failed && refs.length > 0)) {
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

export function portCommand(): Command {
  return new Command('port')
    .description("an instance's forwarded ports (docker port): GUEST/tcp -> HOST_IP:HOST_PORT")
    .argument('<instance>', 'handle, id or id prefix')
    .argument('[port]', 'one guest port (80 or 80/tcp): print only where it is reachable')
    .action(async (ref: string, port: string | undefined) => {
      try {
        const i = await client().getInstance(ref);
        const want = port?.replace(/\/tcp$/i, '');
        const maps = i.ports.filter((p) => want === undefined || String(p.guestPort) === want);
        if (port !== undefined && maps.length === 0) {
          throw new AegisError('NOT_FOUND', `no forwarded port ${port} on ${i.handle} (start it with -p ${want ?? port})`);
        }
        const host = (p: (typeof maps)[number]): string => `${p.hostIp.includes(':') ? `[${p.hostIp}]` : p.hostIp}:${p.hostPort}`;
        process.stdout.write(maps.map((p) => (port !== undefined ? `${host(p)}\n` : `${p.guestPort}/tcp -> ${host(p)}\n`)).join(''));
      } catch (err) {
        fail(err);
      }
    });
}

export function versionCommand(version: string): Command {
  return new Command('version')
    .description("the CLI's version and the daemon's (docker version)")
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      const server = await client()
        .status()
        .catch(() => undefined);
      if (o.json) {
        const out = { client: { version }, server: server ? { version: server.version, backend: server.backend.name } : null };
        process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
        return;
      }
      process.stdout.write(
        `Client: aegis ${version}\n` +
          (server ? `Server: aegisd ${server.version} (backend ${server.backend.name})\n` : 'Server: not running (aegis up)\n'),
      );
    });
}

/**
 * What a Docker user may type that Aegis has no command for, and what to do instead: one line
 * instead of a guess at a similar name ("pull? did you mean kill?").
 */
export const DOCKER_ELSEWHERE: Readonly<Record<string, string>> = {
  build: 'aegis builds no images: pull one (aegis pull REF) or import a `docker save` tar (aegis image import FILE)',
  push: 'aegis keeps images to itself: push with docker or skopeo',
  login: 'aegis reads registry credentials from ~/.docker/config.json (docker login writes them)',
  logout: 'aegis reads registry credentials from ~/.docker/config.json (docker logout removes them)',
  load: 'use aegis image import FILE (a `docker save` or OCI-layout tar)',
  save: 'aegis exports no images yet',
  tag: 'name an image when importing it: aegis image import FILE --name REF',
  rmi: 'use aegis image rm REF',
  create: 'use aegis instance start (it creates and starts at once)',
  attach: 'use aegis logs -f H for its output, or aegis exec -it H -- sh',
  network: 'instances share no networks: each has --network user|none|unfiltered, and --egress-allow / --egress-deny (aegis egress)',
  compose: 'there is no compose: start each instance with aegis run -d',
  commit:
    'aegis cannot save an instance as an image; aegis snapshot create saves it whole (memory too) to start again with instance start --snapshot',
  checkpoint: 'aegis snapshot create H (and aegis instance start --snapshot S, aegis fork H)',
  info: 'use aegis status (and aegis doctor)',
  events: 'there is no event stream yet',
  rename: 'handles are fixed: start a new instance with --name',
  update: 'an instance keeps its shape: aegis instance extend H DURATION changes its deadline',
  search: 'aegis does not search registries',
  history: 'use aegis image list --json (layers and sizes)',
  export: 'use aegis cp H:/ - (a tar of its files on stdout)',
  system: 'use aegis status and aegis doctor',
};

/** Levenshtein distance, for "did you mean" among our own command names. */
function distance(a: string, b: string): number {
  const row = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    let prev = row[0] as number;
    row[0] = i;
    for (let j = 1; j <= b.length; j++) {
      const cur = row[j] as number;
      row[j] = Math.min(cur + 1, (row[j - 1] as number) + 1, prev + (a[i - 1] === b[j - 1] ? 0 : 1));
      prev = cur;
    }
  }
  return row[b.length] as number;
}

/** The one line an unknown command gets: Docker's verb with where it went, or a near name of ours. */
export function unknownCommandLine(name: string, known: string[]): string {
  const elsewhere = DOCKER_ELSEWHERE[name];
  if (elsewhere) return `aegis: no \`${name}\` command: ${elsewhere} [UNSUPPORTED]`;
  const near = known
    .filter((k) => distance(k, name) <= Math.min(2, Math.floor(name.length / 2)))
    .sort((a, b) => distance(a, name) - distance(b, name));
  return `aegis: unknown command '${name}'${near[0] ? `; did you mean ${near[0]}?` : ''} (aegis --help lists them) [INVALID_ARGUMENT]`;
}
