/**
 * The CLI a Docker user already knows (issue "The CLI a Docker user already knows"): Docker's
 * verbs, flags (`-i`, `-t`, `-d`, `-u`, `-m`, `--env-file`, `-w`), `--rm` as a boolean,
 * Docker's exit statuses, quiet pipes, JSON output, and total cancellation: whatever ends a
 * client, its `run` leaves no instance and its exec no guest process.
 */
import { execFile, execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it, onTestFinished } from 'vitest';
import { ROOT, qemuProcessesFor, useDaemon } from './fixture.js';

const daemon = useDaemon();
const AEGIS = path.join(ROOT, 'bin/aegis');

describe('docker-style CLI', () => {
  // `aegis run --rm echo hi` used to answer "command not found: hi": --rm took a value.
  it('takes --rm as a boolean: it never eats the next word; =false keeps the instance; other values are refused', async () => {
    const d = daemon();
    const hi = await d.cli(['run', '--rm', '--network', 'none', 'echo', 'hi']);
    expect([hi.stdout, hi.code]).toEqual(['hi\n', 0]);
    const bad = await d.cli(['run', '--rm=garbage', 'echo', 'hi']);
    expect(bad.code).toBe(125);
    expect(bad.stderr).toMatch(/invalid value "garbage" for --rm.*\[INVALID_ARGUMENT\]/);
    // `--rm false` runs `false` (as docker would) but says so: it reads like a value.
    const warned = await d.cli(['run', '--rm', 'false', '--network', 'none']);
    expect(warned.code).toBe(1);
    expect(warned.stderr).toContain('"false" is the command (write --rm=false for a value)');
    const kept = await d.cli(['run', '--rm=false', '--name', 'kept', '--network', 'none', '--', 'echo', 'kept']);
    expect(kept.stdout).toBe('kept\n');
    expect((await d.client.getInstance('kept')).state).toBe('stopped');
  });

  // `aegis run -- nosuchcmd` exited 1, like a workload that exits 1.
  it("exits as docker does: the workload's status, 127 for a command not found, 125 for an Aegis error", async () => {
    const d = daemon();
    expect((await d.cli(['run', '--network', 'none', '--', 'sh', '-c', 'exit 3'])).code).toBe(3);
    expect((await d.cli(['run', '--network', 'none', '--', 'nosuchcmd'])).code).toBe(127);
    expect((await d.cli(['run', '--memory', '1', '--', 'true'])).code).toBe(125);
  });

  it('has ps, rm, stop, start, kill and inspect at the top level; rm goes on past a missing name and exits 1', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'v1', command: ['sleep', '600'], network: 'none' });
    const ps = await d.cli(['ps']);
    expect(ps.stdout).toMatch(/^HANDLE .*\nv1 +[0-9a-f]{12} +running/);
    const id = (await d.client.getInstance('v1')).id;
    expect((await d.cli(['ps', '-q'])).stdout).toBe(`${id.slice(0, 12)}\n`);
    expect(JSON.parse((await d.cli(['inspect', 'v1'])).stdout)).toMatchObject([{ handle: 'v1', state: 'running' }]);
    expect((await d.cli(['kill', 'v1'])).code).toBe(0);
    for (let i = 0; i < 50 && (await d.client.getInstance('v1')).state !== 'stopped'; i++) await new Promise((r) => setTimeout(r, 100));
    expect((await d.client.getInstance('v1')).exitCode).toBe(137);
    expect((await d.cli(['start', 'v1'])).stdout).toBe('v1\n');
    expect((await d.client.getInstance('v1')).state).toBe('running');
    expect((await d.cli(['stop', '-t', '1', 'v1'])).code).toBe(0);
    const rm = await d.cli(['rm', 'nosuch', 'v1']);
    expect(rm.code).toBe(1);
    expect(rm.stderr).toMatch(/no instance "nosuch"/);
    expect(rm.stdout).toBe('v1\n');
    expect((await d.client.listInstances({ all: true })).map((i) => i.handle)).toEqual([]);
  });

  // `aegis logs web | head -1` ended in a Node stack trace (EPIPE).
  it('ends quietly with status 0 when its reader goes away (logs | head -1)', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'many', command: ['sh', '-c', 'seq 1 20000; exec sleep 600'], network: 'none' });
    for (let i = 0; i < 100 && !(await d.cli(['logs', 'many', '--tail', '1'])).stdout.includes('20000'); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const r = await new Promise<{ out: string; err: string; code: number | null }>((resolve) =>
      execFile('bash', ['-c', `set -o pipefail; "${AEGIS}" logs many | head -1`], { env: d.env }, (e, out, err) =>
        resolve({ out, err, code: e ? (typeof e.code === 'number' ? e.code : 1) : 0 }),
      ),
    );
    expect(r.out).toBe('1\n');
    expect(r.err).toBe('');
    expect(r.code).toBe(0);
    const json = JSON.parse((await d.cli(['logs', '--json', '--tail', '1', 'many'])).stdout) as {
      stream: string;
      text: string;
      timeMs: number;
    };
    expect(json.stream).toBe('stdout');
    expect(json.text).toMatch(/\n20000\n$/);
    expect(json.timeMs).toBeGreaterThan(0);
  });

  // `timeout 4 aegis run --name t -- sleep 40` left `t` running, then stopped, never deleted.
  for (const signal of ['SIGTERM', 'SIGHUP'] as const) {
    it(`a run killed by ${signal} deletes its instance: no instance and no VM left`, async () => {
      const d = daemon();
      const child = spawn(AEGIS, ['run', '--name', 'gone', '--network', 'none', '--', 'sleep', '60'], { env: d.env, stdio: 'ignore' });
      for (let i = 0; i < 300; i++) {
        const list = await d.client.listInstances({ all: true });
        if (list.some((x) => x.handle === 'gone' && x.state === 'running')) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
      child.kill(signal);
      expect(await exited).toBe(signal === 'SIGTERM' ? 143 : 129);
      expect((await d.client.listInstances({ all: true })).map((x) => x.handle)).toEqual([]);
      expect(await qemuProcessesFor(d.home)).toEqual([]);
    });
  }

  it('run -i pipes stdin to the workload; without -i it reads nothing; -it without a terminal is refused as docker does', async () => {
    const d = daemon();
    const piped = await d.cli(['run', '-i', '--network', 'none', '--', 'sh', '-c', 'cat; echo done'], { input: 'piped\n' });
    expect([piped.stdout, piped.code]).toEqual(['piped\ndone\n', 0]);
    const dropped = await d.cli(['run', '--network', 'none', '--', 'cat'], { input: 'ignored\n' });
    expect([dropped.stdout, dropped.code]).toEqual(['', 0]);
    for (const [args, code] of [
      [['run', '-it', '--', 'cat'], 125],
      [['exec', '-it', 'anything', '--', 'cat'], 1],
    ] as const) {
      const r = await d.cli([...args], { input: 'hello\n' });
      expect(r.stderr).toBe('aegis: the input device is not a TTY [INVALID_ARGUMENT]\n');
      expect(r.code).toBe(code);
    }
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });

  it('takes -m with units, --env-file, -u uid:gid and a -w that does not exist yet; errors name the flag', async () => {
    const d = daemon();
    const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-envfile-'));
    onTestFinished(() => rmSync(dir, { recursive: true, force: true }));
    const file = path.join(dir, 'env');
    writeFileSync(file, '# a comment\nA=from file\nB=file\n\nFROM_HOST\nUNSET_HERE\n');
    const r = await d.cli(
      [
        'run',
        '-m',
        '1g',
        '--env-file',
        file,
        '-e',
        'B=flag',
        '-u',
        '1000:1001',
        '-w',
        '/tmp/made/by/run',
        '--network',
        'none',
        '--',
        'sh',
        '-c',
        'id -u; id -g; pwd; echo "$A|$B|$FROM_HOST|${UNSET_HERE-unset}"; grep MemTotal /proc/meminfo',
      ],
      { env: { FROM_HOST: 'host value' } },
    );
    expect(r.stderr).toBe('');
    const [uid, gid, cwd, env, mem] = r.stdout.split('\n');
    expect([uid, gid, cwd, env]).toEqual(['1000', '1001', '/tmp/made/by/run', 'from file|flag|host value|unset']);
    // 1 GiB of guest RAM, less what the kernel keeps for itself.
    expect(Number(/(\d+) kB/.exec(mem ?? '')?.[1])).toBeGreaterThan(900 * 1024);
    for (const [args, re] of [
      [['-m', '100k'], /--memory.*"100k" is not a whole number of MiB/],
      [['--memory', '64m'], /--memory.*out of range: 128m to 64g/],
      [['--cpus', '0'], /--cpus.*must be an integer from 1 to 64/],
      [['--env-file', path.join(dir, 'nosuch')], /--env-file.*cannot read .*nosuch: ENOENT/],
      [['-w', 'relative'], /--workdir.*must be an absolute path/],
      [['--name', 'bad name'], /^aegis: --name must match pattern/],
    ] as const) {
      const bad = await d.cli(['run', ...args, '--', 'true']);
      expect(bad.stderr, args.join(' ')).toMatch(re);
      expect(bad.stderr).toMatch(/\[INVALID_ARGUMENT\]\n$/);
      expect(bad.code).toBe(125);
    }
  });

  it('run -d prints the handle (or JSON); exec -u/-w; top lists guest processes; wait prints the exit code; ps --filter', async () => {
    const d = daemon();
    const started = await d.cli([
      'run',
      '-d',
      '--name',
      'bg',
      '-l',
      'team=red',
      '--label',
      'tier',
      '--network',
      'none',
      '--',
      'sh',
      '-c',
      'sleep 600',
    ]);
    expect([started.stdout, started.code]).toEqual(['bg\n', 0]);
    const json = await d.cli(['run', '-d', '--json', '--name', 'bg2', '--network', 'none', '--', 'sh', '-c', 'sleep 3; exit 4']);
    expect(JSON.parse(json.stdout)).toMatchObject({ handle: 'bg2', state: 'running' });
    const ex = await d.cli(['exec', '-u', 'nobody', '-w', '/var/tmp/x', 'bg', '--', 'sh', '-c', 'id -un; pwd']);
    expect(ex.stdout).toBe('nobody\n/var/tmp/x\n');
    const top = await d.cli(['top', 'bg']);
    expect(top.stdout).toMatch(/^UID +PID +PPID +STAT +RSS +TIME +CMD\n/);
    expect(top.stdout).toMatch(/\n0 +\d+ +\d+ +[SR] +\d+K +\d\d:\d\d:\d\d +sleep 600\n/);
    const topJson = JSON.parse((await d.cli(['top', '--json', 'bg'])).stdout) as { processes: { command: string; pid: number }[] };
    expect(topJson.processes.find((p) => p.command === '/aegis/init')?.pid).toBe(1);
    // wait blocks until the workload exits on its own, then prints its status, as docker wait.
    const wait = await d.cli(['wait', 'bg2']);
    expect([wait.stdout, wait.code]).toEqual(['4\n', 0]);
    expect(JSON.parse((await d.cli(['wait', '--json', 'bg2'])).stdout)).toMatchObject({ state: 'stopped', exitCode: 4 });
    const running = await d.cli(['ps', '-q', '--filter', 'status=running']);
    expect(running.stdout).toBe(`${(await d.client.getInstance('bg')).id.slice(0, 12)}\n`);
    const stopped = JSON.parse((await d.cli(['ps', '--json', '--filter', 'status=stopped', '--filter', 'name=bg'])).stdout) as {
      handle: string;
    }[];
    expect(stopped.map((i) => i.handle)).toEqual(['bg2']);
    expect((await d.cli(['ps', '--filter', 'colour=red'])).stderr).toMatch(/unknown filter "colour"/);
    // Labels: shown by inspect, filtered by ps and by the API.
    expect(JSON.parse((await d.cli(['inspect', 'bg'])).stdout)).toMatchObject([{ labels: { team: 'red', tier: '' } }]);
    expect((await d.cli(['ps', '-a', '-q', '--filter', 'label=team=red'])).stdout).toBe(
      `${(await d.client.getInstance('bg')).id.slice(0, 12)}\n`,
    );
    expect((await d.client.listInstances({ all: true, labels: ['tier'] })).map((i) => i.handle)).toEqual(['bg']);
    expect(await d.client.listInstances({ all: true, labels: ['team=blue'] })).toEqual([]);
  });

  it("stats: CPU and memory of the VMM, the guest's own memory and processes, the scratch disk; paused and stopped", async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'busy', command: ['sh', '-c', 'while :; do :; done'], network: 'none' });
    await d.client.createInstance({ handle: 'idle', command: ['sleep', '600'], network: 'none' });
    await new Promise((r) => setTimeout(r, 1500));
    const r = await d.cli(['stats', '--no-stream', '--json']);
    const stats = JSON.parse(r.stdout) as {
      handle: string;
      cpuPercent: number;
      vmmMemoryBytes: number;
      guestMemoryTotalBytes: number;
      processes: number;
      diskUsedBytes: number;
    }[];
    const busy = stats.find((s) => s.handle === 'busy');
    const idle = stats.find((s) => s.handle === 'idle');
    expect(busy?.cpuPercent).toBeGreaterThan(50); // a guest spinning keeps its vCPU thread busy
    expect(idle?.cpuPercent).toBeLessThan(busy?.cpuPercent ?? 0);
    expect(busy?.guestMemoryTotalBytes).toBeGreaterThan(400 << 20); // 512 MiB less the kernel's share
    expect(busy?.vmmMemoryBytes).toBeGreaterThan(10 << 20);
    expect(busy?.processes).toBeGreaterThan(1);
    expect(busy?.diskUsedBytes).toBeGreaterThan(0);
    const text = await d.cli(['stats', '--no-stream', 'busy']);
    expect(text.stdout).toMatch(
      /^NAME +ID +CPU % +MEM USAGE \/ LIMIT +MEM % +VMM MEM +DISK +PIDS\nbusy +[0-9a-f]{12} +\d+\.\d% +[\d.]+MiB \/ 512\.0MiB/,
    );
    await d.client.pauseInstance('idle');
    expect(await d.client.instanceStats('idle')).toMatchObject({ state: 'paused', guestMemoryUsedBytes: null, processes: null });
    await d.client.stopInstance('busy', { timeoutMs: 500 });
    expect((await d.cli(['stats', '--no-stream', 'busy'])).stderr).toMatch(
      /cannot measure instance "busy": it is stopped.*\[FAILED_PRECONDITION\]/,
    );
    // Streaming (the default) a stopped instance ends at once with the error, not every 2 s forever.
    const streamed = await d.cli(['stats', 'busy'], { timeoutMs: 20_000 });
    expect(streamed.code).toBe(1);
    expect(streamed.stderr.trim().split('\n')).toHaveLength(1);
  });

  it('instance start NAME after instance stop NAME boots that instance again, never a new one running NAME', async () => {
    const d = daemon();
    expect((await d.cli(['instance', 'start', '--name', 'again', '--network', 'none', '--', 'sleep', '600'])).stdout).toBe('again\n');
    expect((await d.cli(['instance', 'stop', 'again'])).code).toBe(0);
    const started = await d.cli(['instance', 'start', 'again']);
    expect([started.stdout, started.code]).toEqual(['again\n', 0]);
    expect((await d.client.getInstance('again')).state).toBe('running');
    expect((await d.client.listInstances({ all: true })).map((i) => i.handle)).toEqual(['again']);
    const ambiguous = await d.cli(['instance', 'start', 'again', 'x']);
    expect([ambiguous.code, ambiguous.stderr]).toEqual([
      2,
      expect.stringMatching(/^aegis: "again" is an instance: aegis start again .* after --.*\n$/),
    ]);
  });

  it('stop records the status Docker does: 143 when SIGTERM ended the workload, 137 when SIGKILL had to; wait prints it', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'term', command: ['sleep', '600'], network: 'none' });
    const ignoring = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print("ready", flush=True); time.sleep(600)';
    await d.client.createInstance({ handle: 'stubborn', command: ['python3', '-c', ignoring], network: 'none' });
    for (let i = 0; i < 100 && !(await d.cli(['logs', 'stubborn'])).stdout.includes('ready'); i++)
      await new Promise((r) => setTimeout(r, 100));
    expect((await d.cli(['stop', 'term'])).code).toBe(0);
    expect((await d.cli(['stop', '-t', '1', 'stubborn'])).code).toBe(0);
    expect((await d.cli(['wait', 'term', 'stubborn'])).stdout).toBe('143\n137\n');
    expect((await d.client.getInstance('term')).exitCode).toBe(143);
  });

  it("has Docker's pull, images, restart, pause, unpause, port and version; Docker verbs it lacks get one line saying what to use", async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'verbs', command: ['sleep', '600'], network: 'none', exposes: [{ guestPort: 80 }] });
    const hostPort = (await d.client.getInstance('verbs')).ports[0]?.hostPort;
    expect((await d.cli(['port', 'verbs'])).stdout).toBe(`80/tcp -> 127.0.0.1:${hostPort}\n`);
    expect((await d.cli(['port', 'verbs', '80/tcp'])).stdout).toBe(`127.0.0.1:${hostPort}\n`);
    const noPort = await d.cli(['port', 'verbs', '81']);
    expect([noPort.code, noPort.stderr]).toEqual([1, expect.stringMatching(/^aegis: no forwarded port 81 on verbs .*\[NOT_FOUND\]\n$/)]);
    expect((await d.cli(['pause', 'verbs'])).stdout).toBe('verbs\n');
    expect((await d.client.getInstance('verbs')).state).toBe('paused');
    expect((await d.cli(['unpause', 'verbs'])).stdout).toBe('verbs\n');
    expect((await d.cli(['restart', 'verbs'])).stdout).toBe('verbs\n');
    expect((await d.client.getInstance('verbs')).state).toBe('running');
    expect((await d.cli(['images'])).stdout).toMatch(/^REFERENCE/);
    // `pull` is ours now (it reaches the registry client), not "did you mean kill?".
    const pull = await d.cli(['pull', 'localhost:1/nothing:here']);
    expect(pull.code).not.toBe(0);
    expect(pull.stderr).not.toMatch(/unknown command|did you mean/);
    const version = await d.cli(['version']);
    expect(version.stdout).toMatch(/^Client: aegis \d+\.\d+\.\d+\nServer: aegisd \S+ \(backend \w+\)\n$/);
    for (const [verb, hint] of [
      ['build', 'aegis image import'],
      ['login', '~/.docker/config.json'],
      ['network', '--egress-allow'],
    ] as const) {
      const r = await d.cli([verb]);
      expect([r.code, r.stderr.trim().split('\n').length], verb).toEqual([1, 1]);
      expect(r.stderr).toContain(hint);
    }
    const typo = await d.cli(['restrat', 'verbs']);
    expect(typo.stderr).toBe("aegis: unknown command 'restrat'; did you mean restart? (aegis --help lists them) [INVALID_ARGUMENT]\n");

    // exec -d: started, its id printed, running on after the CLI is gone; output in the log.
    const bg = await d.cli(['exec', '-d', 'verbs', '--', 'sh', '-c', 'echo detached-out; sleep 2; echo done > /tmp/exec-d']);
    expect([bg.code, bg.stdout]).toEqual([0, expect.stringMatching(/^[0-9a-f]{12}\n$/)]);
    const check = await d.cli(['exec', 'verbs', '--', 'sh', '-c', 'while [ ! -e /tmp/exec-d ]; do sleep 0.2; done; cat /tmp/exec-d']);
    expect(check.stdout).toBe('done\n');
    expect((await d.cli(['logs', '--execs', 'verbs'])).stdout).toContain('detached-out\n');
    const dIt = await d.cli(['exec', '-d', '-i', 'verbs', '--', 'cat']);
    expect([dIt.code, dIt.stderr]).toEqual([
      2,
      'aegis: -d runs the command with nobody attached: leave out -i and -t [INVALID_ARGUMENT]\n',
    ]);
    // ps --format and inspect -f: Docker's template names and ours.
    const id = (await d.client.getInstance('verbs')).id;
    expect((await d.cli(['ps', '--format', '{{.Names}} {{.ID}} {{.State}} {{.handle}}'])).stdout).toBe(
      `verbs ${id.slice(0, 12)} running verbs\n`,
    );
    const tbl = await d.cli(['ps', '--format', 'table {{.Names}}\\t{{.Ports}}']);
    expect(tbl.stdout).toBe(`NAMES  PORTS\nverbs  127.0.0.1:${hostPort}->80/tcp\n`);
    expect(
      (await d.cli(['inspect', '-f', '{{.State.Status}} {{.State.Running}} {{.Id}} {{.Name}} {{json .Config.Cmd}}', 'verbs'])).stdout,
    ).toBe(`running true ${id} verbs ["sleep","600"]\n`);
    expect((await d.cli(['inspect', '--format', '{{.state}}/{{.exitCode}}', 'verbs'])).stdout).toBe('running/<nil>\n');
    expect(JSON.parse((await d.cli(['inspect', '--json', 'verbs'])).stdout)).toMatchObject([{ handle: 'verbs' }]);
    const badTemplate = await d.cli(['ps', '--format', '{{if .Names}}x{{end}}']);
    expect([badTemplate.code, badTemplate.stderr]).toEqual([2, expect.stringMatching(/is not supported: supported: .*use --json/)]);
  });

  it('--json errors are JSON on stdout too (no daemon: UNAVAILABLE)', async () => {
    const home = mkdtempSync(path.join(os.tmpdir(), 'aegis-nodaemon-'));
    for (const args of [
      ['status', '--json'],
      ['ps', '--json'],
      ['top', '--json', 'x'],
    ]) {
      const r = await new Promise<{ stdout: string; code: number }>((resolve) =>
        execFile(AEGIS, args, { env: { ...process.env, AEGIS_HOME: home } }, (e, stdout) =>
          resolve({ stdout, code: e ? Number(e.code) : 0 }),
        ),
      );
      expect(JSON.parse(r.stdout), args.join(' ')).toMatchObject({ error: { code: 'UNAVAILABLE' } });
      expect(r.code).not.toBe(0);
    }
  });
});

/** Polls until `check` holds (a VM to come up, a process to go), at most `ms`. */
async function until(check: () => Promise<boolean>, ms = 30_000): Promise<void> {
  for (const end = Date.now() + ms; Date.now() < end;) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`condition not met within ${ms} ms`);
}

describe('cancellation is total: the daemon ends what a client that went away started', () => {
  const running = (d: ReturnType<typeof daemon>, handle: string) => async () =>
    (await d.client.listInstances({ all: true })).some((x) => x.handle === handle && x.state === 'running');
  const nothingLeft = async (d: ReturnType<typeof daemon>): Promise<void> => {
    await until(async () => (await d.client.listInstances({ all: true })).length === 0, 20_000);
    expect(await qemuProcessesFor(d.home)).toEqual([]);
  };
  const guestHas = async (d: ReturnType<typeof daemon>, ref: string, command: string): Promise<boolean> =>
    (await d.client.topInstance(ref)).processes.some((p) => p.command === command);

  it('a run whose CLI is SIGKILLed (no handler runs): the daemon deletes the instance', async () => {
    const d = daemon();
    const child = spawn(AEGIS, ['run', '--name', 'k9', '--network', 'none', '--', 'sleep', '600'], { env: d.env, stdio: 'ignore' });
    await until(running(d, 'k9'));
    child.kill('SIGKILL');
    await nothingLeft(d);
  });

  it('a run whose client aborts its AbortSignal, and one whose raw socket closes: deleted', async () => {
    const d = daemon();
    const abort = new AbortController();
    const events = d.client.run({ handle: 'ab', command: ['sleep', '600'], network: 'none', autoRemove: true }, abort.signal);
    for await (const ev of events) if (ev.type === 'created') break; // leaving the loop ends the stream too
    await nothingLeft(d);
    const consumed = (async () => {
      for await (const ev of d.client.run({ handle: 'ab2', command: ['sleep', '600'], network: 'none', autoRemove: true }, abort.signal))
        void ev;
    })();
    void consumed.catch(() => undefined);
    await until(running(d, 'ab2'));
    abort.abort();
    await expect(consumed).rejects.toMatchObject({ code: 'CANCELLED' });
    await nothingLeft(d);

    const body = JSON.stringify({ handle: 'raw', command: ['sleep', '600'], network: 'none', autoRemove: true });
    const socket = net.connect(path.join(d.home, 'aegisd.sock'));
    socket.write(`POST /v1/run HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`);
    let seen = '';
    await new Promise<void>((resolve) =>
      socket.on('data', (c: Buffer) => {
        seen += c.toString();
        if (seen.includes('"type":"created"')) resolve();
      }),
    );
    socket.destroy();
    await nothingLeft(d);
  });

  it('an exec whose CLI is killed, or whose client aborts: its whole guest process group is killed', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'box', command: ['sleep', '600'], network: 'none' });
    // sh forks sleep: killing sh alone would leave `sleep 45` running.
    const child = spawn(AEGIS, ['exec', 'box', '--', 'sh', '-c', 'sleep 45; echo never'], { env: d.env, stdio: 'ignore' });
    await until(() => guestHas(d, 'box', 'sleep 45'));
    child.kill('SIGTERM');
    await until(async () => !(await guestHas(d, 'box', 'sleep 45')), 10_000);
    await expect(
      (async () => {
        for await (const ev of d.client.exec('box', { command: ['sh', '-c', 'sleep 46; echo never'] }, AbortSignal.timeout(1500))) void ev;
      })(),
    ).rejects.toMatchObject({ code: 'TIMEOUT' });
    await until(async () => !(await guestHas(d, 'box', 'sleep 46')), 10_000);
  });

  it('run -it in a terminal: an interactive shell; closing the terminal, even by SIGKILL of its server, deletes the instance', async () => {
    const d = daemon();
    const socket = path.join(d.home, 'tmux.sock');
    const tmux = (...args: string[]): string => execFileSync('tmux', ['-S', socket, ...args], { encoding: 'utf8' });
    const screen = async (re: RegExp): Promise<void> =>
      until(async () => Promise.resolve(re.test(tmux('capture-pane', '-p', '-t', 'run'))), 60_000);
    for (const end of ['kill-session', 'SIGKILL'] as const) {
      tmux(
        'new-session',
        '-d',
        '-s',
        'run',
        '-x',
        '100',
        '-y',
        '30',
        `env AEGIS_HOME=${d.home} ${AEGIS} run -it --name tt --network none -- sh`,
      );
      await screen(/#\s*$/m);
      tmux('send-keys', '-t', 'run', 'echo $((6*7)); stty size', 'Enter');
      await screen(/^42\n30 100$/m);
      if (end === 'kill-session') tmux('kill-session', '-t', 'run');
      else process.kill(Number(tmux('display-message', '-p', '#{pid}').trim()), 'SIGKILL');
      await nothingLeft(d);
    }
  });
});
