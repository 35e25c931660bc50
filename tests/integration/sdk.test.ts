/**
 * The TypeScript SDK as a user gets it: `npm pack` of packages/sdk installed into an empty
 * project outside this repository, its types checked by tsc there, and a program using it
 * against a real daemon and real VMs.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ROOT, useDaemon } from './fixture.js';

const daemon = useDaemon();
const project = mkdtempSync(path.join(os.tmpdir(), 'aegis-sdk-user-'));

function run(
  cmd: string,
  args: string[],
  options: { cwd: string; env?: NodeJS.ProcessEnv; timeoutMs?: number },
): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) =>
    execFile(
      cmd,
      args,
      { cwd: options.cwd, env: options.env ?? process.env, timeout: options.timeoutMs ?? 120_000, maxBuffer: 16 << 20 },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    ),
  );
}

beforeAll(async () => {
  // From a clean tree: `npm pack` alone must build what the tarball ships (its prepack).
  rmSync(path.join(ROOT, 'packages/sdk/dist'), { recursive: true, force: true });
  rmSync(path.join(ROOT, 'packages/sdk/tsconfig.tsbuildinfo'), { force: true });
  const packed = await run('npm', ['pack', '--silent', '--pack-destination', project], { cwd: path.join(ROOT, 'packages/sdk') });
  expect(packed.code, packed.stderr).toBe(0);
  const tarball = readdirSync(project).find((f) => f.endsWith('.tgz'));
  expect(tarball).toBeDefined();
  writeFileSync(path.join(project, 'package.json'), JSON.stringify({ name: 'sdk-user', private: true, type: 'module' }));
  const installed = await run('npm', ['install', '--no-audit', '--no-fund', '--offline', `./${tarball ?? ''}`], {
    cwd: project,
    timeoutMs: 300_000,
  });
  expect(installed.code, installed.stderr).toBe(0);
}, 600_000);

afterAll(() => rmSync(project, { recursive: true, force: true }));

describe('@aegis/sdk from its npm tarball', () => {
  it('installs with no other package and type-checks a user program', async () => {
    expect(readdirSync(path.join(project, 'node_modules')).filter((n) => !n.startsWith('.'))).toEqual(['@aegis']);
    writeFileSync(
      path.join(project, 'check.ts'),
      `import { Sandbox, NotFoundError, type CommandResult } from '@aegis/sdk';
async function main(): Promise<void> {
  await using sbx = await Sandbox.create({ env: { A: '1' }, ports: [80] });
  const r: CommandResult = await sbx.commands.run('echo hi', { onStdout: (s: string) => void s });
  const bytes: Uint8Array = await sbx.files.read('/x', { format: 'bytes' });
  const text: string = await sbx.files.read('/x');
  const host: string = sbx.getHost(80);
  void [r.exitCode, bytes, text, host, NotFoundError];
}
void main;
`,
    );
    writeFileSync(
      path.join(project, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          target: 'ES2022',
          lib: ['ES2023', 'ESNext.Disposable', 'DOM'],
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          strict: true,
          noEmit: true,
          types: [],
        },
        files: ['check.ts'],
      }),
    );
    const tsc = await run(process.execPath, [path.join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', project], { cwd: project });
    expect(tsc.stdout + tsc.stderr).toBe('');
    expect(tsc.code).toBe(0);
  });

  it('creates a sandbox, runs commands (string under sh, array as argv, streamed, cancelled), moves files, and kills it', async () => {
    const d = daemon();
    writeFileSync(
      path.join(project, 'use.mjs'),
      `import { Sandbox, NotFoundError, CancelledError, TimeoutError, InvalidArgumentError, CommandExitError, SandboxError } from '@aegis/sdk';
const out = {};
const sbx = await Sandbox.create({ env: { A: '6' }, ports: [8080], network: 'none' });
try {
  out.name = sbx.name;
  out.run = await sbx.commands.run('echo $((A*7)); echo err >&2; exit 3');
  out.argv = (await sbx.commands.run(['printf', '%s|', 'a b', '$HOME'])).stdout;
  const seen = [];
  out.streamed = (await sbx.commands.run('for i in 1 2 3; do echo $i; done', { onStdout: (s) => seen.push(s) })).stdout;
  out.seen = seen.join('');
  out.stdin = (await sbx.commands.run('cat', { stdin: 'fed\\n' })).stdout;
  out.cwdUser = (await sbx.commands.run('pwd; id -un', { cwd: '/tmp/made', user: 'nobody' })).stdout;
  await sbx.files.write('/tmp/a.py', 'print(1)\\n');
  out.read = await sbx.files.read('/tmp/a.py');
  out.bytes = Array.from(await sbx.files.read('/tmp/a.py', { format: 'bytes' })).length;
  out.list = (await sbx.files.list('/tmp')).map((f) => f.name).sort();
  out.exists = [await sbx.files.exists('/tmp/a.py'), await sbx.files.exists('/tmp/nope')];
  try { await sbx.files.read('/tmp/nope'); } catch (e) { out.notFound = [e instanceof NotFoundError, e.code]; }
  const h = await sbx.commands.start('sleep 300');
  await h.kill();
  out.killed = (await h.wait()).exitCode;
  try { await sbx.commands.run('sleep 300', { timeoutMs: 1500 }); } catch (e) { out.timeout = [e instanceof TimeoutError, e.code]; }
  const ac = new AbortController();
  setTimeout(() => ac.abort(), 1000);
  try { await sbx.commands.run('sleep 301', { signal: ac.signal }); } catch (e) { out.cancelled = [e instanceof CancelledError, e.code]; }
  out.left = (await sbx.commands.run('for f in /proc/[0-9]*/cmdline; do tr "\\\\0" " " < $f; echo; done')).stdout.includes('sleep 30');
  out.seesItself = (await sbx.commands.run('for f in /proc/[0-9]*/cmdline; do tr "\\\\0" " " < $f; echo; done')).stdout.includes('/aegis/init');
  out.host = sbx.getHost(8080);
  // What a newcomer trips on: parents made by write, a missing command as exit 127 either way,
  // options we do not have named, a default life of 5 minutes.
  await sbx.files.write('/work/deep/a.py', 'print(2)\\n');
  out.deep = await sbx.files.read('/work/deep/a.py');
  out.missing = [(await sbx.commands.run(['nosuchcmd'])).exitCode, (await sbx.commands.run('nosuchcmd')).exitCode];
  // E2B users expect a failed command to throw: opt-in here.
  try { await sbx.commands.run('echo partial; echo why >&2; exit 4', { throwOnError: true }); } catch (e) {
    out.thrown = [e instanceof CommandExitError, e instanceof SandboxError, e.exitCode, e.stdout, e.stderr, e.message];
  }
  out.notThrown = (await sbx.commands.run('true', { throwOnError: true })).exitCode;
  try { await sbx.commands.run('true', { background: true }); } catch (e) { out.background = [e instanceof InvalidArgumentError, e.message]; }
  out.deadlineS = Math.round((sbx.deadline.getTime() - Date.now()) / 1000);
} finally {
  await sbx[Symbol.asyncDispose]();
}
out.gone = await Sandbox.connect(sbx.id).then(() => 'still there', (e) => e.code);
try { await Sandbox.create({ envs: { A: '1' } }); } catch (e) { out.envs = [e.code, e.message]; }
const shared = process.env.SHARED_DIR;
const withVolume = await Sandbox.create({ network: 'none', volumes: [{ type: 'bind', source: shared, target: '/shared' }] });
try {
  out.volume = (await withVolume.commands.run('echo from-guest > /shared/out.txt && cat /shared/in.txt')).stdout;
} finally {
  await withVolume.kill();
}
console.log(JSON.stringify(out));
`,
    );
    const shared = path.join(project, 'shared');
    mkdirSync(shared);
    writeFileSync(path.join(shared, 'in.txt'), 'from-host\n');
    const r = await run(process.execPath, ['use.mjs'], {
      cwd: project,
      env: { ...process.env, AEGIS_HOME: d.home, SHARED_DIR: shared },
      timeoutMs: 180_000,
    });
    expect(r.stderr).toBe('');
    const out = JSON.parse(r.stdout) as Record<string, unknown>;
    expect(out['run']).toEqual({ exitCode: 3, signal: null, stdout: '42\n', stderr: 'err\n' });
    expect(out['argv']).toBe('a b|$HOME|');
    expect([out['streamed'], out['seen']]).toEqual(['1\n2\n3\n', '1\n2\n3\n']);
    expect(out['stdin']).toBe('fed\n');
    expect(out['cwdUser']).toBe('/tmp/made\nnobody\n');
    expect([out['read'], out['bytes']]).toEqual(['print(1)\n', 9]);
    expect(out['list']).toContain('a.py');
    expect(out['exists']).toEqual([true, false]);
    expect(out['notFound']).toEqual([true, 'NOT_FOUND']);
    expect(out['killed']).toBe(137);
    expect(out['timeout']).toEqual([true, 'TIMEOUT']);
    expect(out['cancelled']).toEqual([true, 'CANCELLED']);
    expect([out['left'], out['seesItself']]).toEqual([false, true]); // the timed-out and cancelled commands were killed in the guest
    expect(out['host']).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(out['gone']).toBe('NOT_FOUND');
    expect(out['volume']).toBe('from-host\n');
    expect(out['deep']).toBe('print(2)\n');
    expect(out['missing']).toEqual([127, 127]);
    expect(out['thrown']).toEqual([true, false, 4, 'partial\n', 'why\n', 'the command exited with 4: why']);
    expect(out['notThrown']).toBe(0);
    expect(out['background']).toEqual([
      true,
      'commands.run/start: unknown option "background"; use commands.start() (it returns at once with a handle)',
    ]);
    expect(out['envs']).toEqual(['INVALID_ARGUMENT', 'Sandbox.create: unknown option "envs"; use env']);
    expect(out['deadlineS']).toBeGreaterThan(240);
    expect(out['deadlineS']).toBeLessThanOrEqual(300);
    expect(readFileSync(path.join(shared, 'out.txt'), 'utf8')).toBe('from-guest\n');
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });
  it('snapshot(), fork() and create({ snapshot }): copies that carry on from the same point, each its own', async () => {
    const d = daemon();
    writeFileSync(
      path.join(project, 'fork.mjs'),
      `import { Sandbox, FailedPreconditionError } from '@aegis/sdk';
const out = {};
const sbx = await Sandbox.create({ network: 'none', command: ['sh', '-c', 'i=0; while :; do i=$((i+1)); echo $i > /tmp/n; sleep 0.2; done'] });
try {
  await sbx.files.write('/root/note.txt', 'before\\n');
  const forks = await sbx.fork(2);
  out.forks = forks.length;
  for (const [i, f] of forks.entries()) {
    await f.files.write('/root/mine.txt', String(i));
    out['fork' + i] = [(await f.files.read('/root/note.txt')), Number((await f.commands.run('cat /tmp/n')).stdout) > 1, (await f.commands.run('hostname')).stdout.trim() === f.name];
  }
  out.isolated = await sbx.files.exists('/root/mine.txt');
  // Hibernated (durable, no VM) and woken by the next call, where it was; kept, though throwaway.
  await sbx.hibernate();
  out.slept = [await sbx.isRunning(), await sbx.files.read('/root/note.txt'), await sbx.isRunning()];
  const snap = await sbx.snapshot({ name: 'sdk-snap' });
  out.snap = [snap.name, snap.source.name === sbx.name, snap.sizeBytes > 0];
  const again = await Sandbox.create({ snapshot: 'sdk-snap' });
  out.again = await again.files.read('/root/note.txt');
  try { await Sandbox.deleteSnapshot('sdk-snap'); } catch (e) { out.inUse = e instanceof FailedPreconditionError; }
  await again.kill();
  for (const f of forks) await f.kill();
  await Sandbox.deleteSnapshot('sdk-snap');
  // The forks' own checkpoint goes with the last of them, just after.
  for (let i = 0; i < 50 && (await Sandbox.listSnapshots()).length > 0; i++) await new Promise((r) => setTimeout(r, 200));
  out.left = (await Sandbox.listSnapshots()).length;
} finally {
  await sbx.kill();
}
console.log(JSON.stringify(out));
`,
    );
    const r = await run(process.execPath, ['fork.mjs'], { cwd: project, env: { ...process.env, AEGIS_HOME: d.home }, timeoutMs: 300_000 });
    expect(r.stderr).toBe('');
    expect(JSON.parse(r.stdout)).toEqual({
      forks: 2,
      fork0: ['before\n', true, true],
      fork1: ['before\n', true, true],
      isolated: false,
      slept: [false, 'before\n', true],
      snap: ['sdk-snap', true, true],
      again: 'before\n',
      inUse: true,
      left: 0,
    });
    await expect.poll(() => d.client.listInstances({ all: true }), { timeout: 15_000 }).toEqual([]);
  });
});
