/**
 * Docs that run (issue 27, item 5): every code block of README.md, docs/*.md and the package
 * READMEs is run here as a reader would run it, against a real aegisd and real VMs, or is marked
 * in the doc as not runnable, with the reason (`<!-- docs-test: skip (reason: …) -->` right
 * before it, see tests/support/doc-blocks.ts). A block with neither fails, naming file and line,
 * so an example cannot rot unnoticed.
 *
 * - Shell blocks run line by line, in order, each in its own `bash -c` from the repository root
 *   with AEGIS_HOME the test daemon's home; every line must exit 0. A line that is not an
 *   `aegis` command must be in LINE_RULES below, which says what the test does instead and why
 *   (run it with a visible substitution, or skip it); a line no rule covers fails its block.
 * - JS/TS blocks that import @aegis/sdk run with node in a scratch project whose @aegis/sdk is
 *   this checkout's package; a TypeScript block is type-checked and compiled by tsc first, as its
 *   reader would. An image an example names comes from IMAGE_STAND_INS (no test reaches Docker Hub).
 *
 * Which blocks ran, how, and which lines were skipped and why is printed at the end.
 */
import { execFile, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import ts from 'typescript';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { docFiles, extractBlocks, parseMarker, shellLines, splitComment, type DocBlock, type ShellLine } from '../support/doc-blocks.js';
import { buildGlibcImage, exportDockerArchive, type TestImage } from '../support/oci-images.js';
import { pushOciLayout, startRegistry, type TestRegistry } from '../support/registry.js';
import { ROOT, TestDaemon, teardown, until } from './fixture.js';

// ---- what the test does with each kind of line and block ---------------------------------------

interface Ctx {
  d: TestDaemon;
  /** Scratch space of this run (stands in for the reader's /tmp and projects). */
  work: string;
}

interface LineRule {
  match: RegExp;
  /** Not run, for this reason. */
  skip?: string;
  /** What the test does differently from a reader, shown in the summary. */
  how?: string;
  /** Runs the line; returns what was run (the command as executed) when it differs from the doc. */
  run?: (line: ShellLine, ctx: Ctx) => Promise<string | void>;
}

const LINE_RULES: LineRule[] = [
  {
    match: /^make demo$/,
    skip:
      'builds every artifact into $AEGIS_HOME/cache (the kernel from source, 10–15 min on 2 cores, apt-get for what is missing) and starts a daemon; ' +
      'the Use block below runs what it ends with (`aegis run -- echo hello`)',
  },
  { match: /^make test$/, skip: 'runs the whole test suite, this test included; CI runs it' },
  {
    match: /^\.\/bin\/aegisd &$/,
    how: 'run as written (its output into the daemon log); the test waits until the daemon answers before the next line, as a reader would',
    run: async (line, { d }) => {
      const log = openSync(d.logFile, 'a');
      const child = spawn('bash', ['-c', line.command], { cwd: ROOT, env: lineEnv(d), stdio: ['ignore', log, log] });
      closeSync(log);
      const code = await new Promise<number | null>((resolve) => child.once('exit', resolve));
      expect(code, `${line.text}: bash exited ${code}`).toBe(0);
      await until(() => daemonPid(d).then((pid) => pid !== undefined), 20_000, `aegisd to answer after \`${line.text}\`\n${d.log()}`);
    },
  },
  {
    // Serves until stopped: started in the background, curled as its comment says, then Ctrl-C.
    match: /^\.\/bin\/aegis run -p 8080:80 -- python3 -m http\.server 80$/,
    how:
      'host port 8080 → a free port (8080 may be taken on the machine); run in the background, `curl` as its comment says (each try ' +
      'bounded to 10 s) until the ' +
      "guest's directory listing comes back, then Ctrl-C (SIGINT) as a reader would: it must end with status 0 and leave no instance",
    run: async (line, { d }) => {
      const url = /^curl (http:\/\/127\.0\.0\.1:8080\/)$/.exec(line.comment)?.[1];
      expect(url, `${line.text}: expected a \`# curl http://127.0.0.1:8080/\` comment`).toBeDefined();
      const port = await freePort();
      const command = line.command.replace('-p 8080:80', `-p ${port}:80`);
      const curl = `curl ${url?.replace(':8080', `:${port}`) ?? ''}`;
      const child = spawn('bash', ['-c', `exec ${command}`], { cwd: ROOT, env: lineEnv(d), stdio: ['ignore', 'pipe', 'pipe'] });
      let output = '';
      child.stdout.on('data', (c: Buffer) => (output += c.toString()));
      child.stderr.on('data', (c: Buffer) => (output += c.toString()));
      const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
      try {
        // Each try bounded: a connection made before the instance runs is accepted and never
        // answered (PortForwarder binds before the boot but handles connections only from serve()).
        let last: Bash | undefined;
        for (const end = Date.now() + 120_000; ;) {
          if (child.exitCode !== null) throw new Error(`${command} ended before serving (status ${child.exitCode}):\n${output}`);
          last = await bash(curl.replace(/^curl /, 'curl --max-time 10 '), { env: lineEnv(d) });
          if (last.code === 0 && last.stdout.includes('Directory listing for /')) break;
          if (Date.now() > end) throw new Error(`${curl} did not answer with a directory listing in 120 s: ${last.code} ${last.stderr}`);
          await new Promise((r) => setTimeout(r, 250));
        }
      } finally {
        child.kill('SIGINT');
      }
      const code = await Promise.race([exited, new Promise<'hung'>((r) => setTimeout(() => r('hung'), 30_000))]);
      expect(code, `${command} after Ctrl-C:\n${output}`).toBe(0);
      await until(async () => (await d.client.listInstances({ all: true })).length === 0, 20_000, 'the throwaway instance to go');
      return `${command}   (then: ${curl}; Ctrl-C)`;
    },
  },
  {
    match: /registry\.example:5000\//,
    how:
      'registry.example:5000 → a docker-registry on loopback (tests/support/registry.ts) holding the IMAGE_STAND_INS image of that ' +
      'name; otherwise the line runs as written',
    run: async (line, ctx) => {
      const host = await registryHost();
      for (const [, ref] of line.command.matchAll(/registry\.example:5000\/(\S+)/g)) {
        const name = `registry.example:5000/${ref ?? ''}`;
        if (pushed.has(name)) continue;
        const standIn = IMAGE_STAND_INS[name];
        if (!standIn) throw new Error(`no stand-in image for ${name} in IMAGE_STAND_INS`);
        const image = await standIn.image();
        await pushOciLayout(image.layoutDir, `${host}/${ref ?? ''}`, undefined, image.ref);
        pushed.add(name);
        note(`    (image ${name}: ${standIn.why})`);
      }
      const command = line.command.replaceAll('registry.example:5000/', `${host}/`);
      await runAegisLine({ ...line, command }, ctx);
      return command;
    },
  },
  {
    match: /^npm pack -w @aegis\/sdk --pack-destination \/tmp$/,
    how: '/tmp → a scratch directory of this test (so concurrent runs do not share a tarball); npm kept offline',
    run: async (line, { d, work }) => {
      const command = line.command.replace('--pack-destination /tmp', `--pack-destination ${work}`);
      const r = await bash(command, { env: lineEnv(d), timeoutMs: 300_000 });
      expect(r.code, `${command}:\n${r.stderr}`).toBe(0);
      return command;
    },
  },
  {
    match: /^cd my-project && npm install \/tmp\/aegis-sdk-[0-9.]+\.tgz$/,
    how: "run in the scratch directory, where the test made an empty my-project/ (the reader's own project); /tmp → that directory",
    run: async (line, { d, work }) => {
      mkdirSync(path.join(work, 'my-project'), { recursive: true });
      const command = line.command.replace(' /tmp/', ` ${work}/`);
      const r = await bash(command, { cwd: work, env: lineEnv(d), timeoutMs: 300_000 });
      expect(r.code, `${command}:\n${r.stderr}`).toBe(0);
      expect(existsSync(path.join(work, 'my-project/node_modules/@aegis/sdk/dist/sdk.mjs')), 'the SDK installed into my-project').toBe(
        true,
      );
      return `(cd ${work}) ${command}`;
    },
  },
];

/** `aegis` commands (chained with `&&`, `||` or `;`, perhaps piped on): run as written; the line must exit 0. */
const AEGIS_COMMAND = /^(\.\/bin\/)?aegis\s/;
const isAegisLine = (command: string): boolean => command.split(/&&|\|\||;/).every((part) => AEGIS_COMMAND.test(part.trim()));

/** Lines whose output the doc states or implies, checked beside the exit status. */
const EXPECTED_STDOUT: [RegExp, string][] = [
  [/ -- echo hello$/, 'hello\n'],
  [/ -- python3 -c 'print\(1\)'$/, '1\n'],
];

/** Images the examples name that this machine cannot pull, and what stands in for them. */
const IMAGE_STAND_INS: Record<string, { image: () => Promise<TestImage>; why: string }> = {
  'registry.example:5000/team/tools:1.2': {
    image: () => buildGlibcImage(),
    why: "a made-up registry; the stand-in is the tests' Debian python3 image (tests/support/oci-images.ts)",
  },
  'python:3.12': {
    image: () => buildGlibcImage(),
    why: "Docker Hub is not reached from tests (and the image is ~1 GB); the tests' Debian python3 image is imported under that name (it has no pip)",
  },
};

const SHELL_LANGS = new Set(['', 'sh', 'bash', 'shell', 'console']);
const JS_LANGS = new Set(['js', 'mjs', 'javascript']);
const TS_LANGS = new Set(['ts', 'mts', 'typescript']);
const SDK_IMPORT = /from ['"]@aegis\/sdk['"]/;

/** What the SDK examples print, where the doc says. */
const SDK_EXPECTED: [RegExp, (stdout: string) => void][] = [
  [/console\.log\(\(await sbx\.commands\.run\('echo hello'\)\)\.stdout\)/, (out) => expect(out).toBe('hello\n\n')],
  [/console\.log\(`http:\/\/\$\{sbx\.getHost\(8000\)\}\/`\)/, (out) => expect(out).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/$/m)],
];

// ---- planning: which runner takes each block ---------------------------------------------------

type Plan =
  | { kind: 'skip'; reason: string }
  | { kind: 'broken'; why: string }
  | { kind: 'shell'; lines: { line: ShellLine; rule?: LineRule }[] }
  | { kind: 'sdk'; typescript: boolean };

function plan(block: DocBlock): Plan {
  const where = `${block.file}:${block.line}`;
  const mark = `mark it \`<!-- docs-test: skip (reason: …) -->\` if it is not meant to run`;
  if (block.marker?.kind === 'skip') return { kind: 'skip', reason: block.marker.reason };
  if (block.marker?.kind === 'invalid') return { kind: 'broken', why: `${where}: ${block.marker.why}: ${block.marker.text}` };
  if (SHELL_LANGS.has(block.lang)) {
    const lines = shellLines(block).map((line) => ({ line, rule: LINE_RULES.find((r) => r.match.test(line.command)) }));
    const unknown = lines.find((l) => !l.rule && !isAegisLine(l.line.command));
    if (unknown)
      return {
        kind: 'broken',
        why: `${block.file}:${unknown.line.line}: \`${unknown.line.text}\` is neither an aegis command nor in this test's LINE_RULES; add a rule, or ${mark}`,
      };
    if (lines.length === 0) return { kind: 'broken', why: `${where}: an empty block; ${mark}` };
    if (lines.every((l) => l.rule?.skip))
      return { kind: 'skip', reason: lines.map((l) => `\`${l.line.command}\`: ${l.rule?.skip ?? ''}`).join('; ') };
    return { kind: 'shell', lines };
  }
  if ((JS_LANGS.has(block.lang) || TS_LANGS.has(block.lang)) && SDK_IMPORT.test(block.content))
    return { kind: 'sdk', typescript: TS_LANGS.has(block.lang) };
  return { kind: 'broken', why: `${where}: no runner in this test takes a \`${block.lang || 'plain'}\` block like this one; ${mark}` };
}

// ---- the run ----------------------------------------------------------------------------------

const blocks = docFiles(ROOT).flatMap((f) => extractBlocks(f, readFileSync(path.join(ROOT, f), 'utf8')));
const work = mkdtempSync(path.join(os.tmpdir(), 'aegis-docs-'));
const d = new TestDaemon(mkdtempSync('/tmp/aegis-it-'));
const ctx: Ctx = { d, work };
/** What happened to each block, in the docs' order, printed at the end. */
const summary = new Map(blocks.map((b) => [`${b.file}:${b.line}`, [] as string[]]));
let current = '';
function note(text: string, where = current): void {
  summary.get(where)?.push(text);
}
let registry: TestRegistry | undefined;
let anyFailed = false;

afterEach((c) => {
  if (c.task.result?.state === 'fail') anyFailed = true;
});

afterAll(async () => {
  const lines = [...summary].flatMap(([where, notes]) => (notes.length > 0 ? notes : [`  ${where}: not run in this invocation`]));
  console.log(`docs-run: ${blocks.length} blocks\n${lines.join('\n')}`);
  for (const i of await d.client.listInstances({ all: true }).catch(() => [])) {
    await d.client.deleteInstance(i.id, { force: true }).catch(() => undefined);
  }
  // A daemon the docs started (`./bin/aegisd &`, `aegis up`) and did not stop is not the fixture's.
  const pid = await daemonPid(d);
  if (pid !== undefined && pid !== d.pid) await stopPid(pid);
  await teardown(d, anyFailed);
  await registry?.stop();
  rmSync(work, { recursive: true, force: true });
});

describe('the block finder', () => {
  it('finds the blocks of README.md, docs/*.md and the package READMEs', () => {
    expect(docFiles(ROOT)).toEqual(expect.arrayContaining(['README.md', 'docs/docker.md', 'packages/sdk/README.md']));
    expect(blocks.filter((b) => b.file === 'README.md').length).toBeGreaterThan(0);
    expect(blocks.filter((b) => b.file === 'packages/sdk/README.md').length).toBeGreaterThan(0);
  });

  it('finds fences in lists, ~~~ fences and indented blocks, with the marker right before each', () => {
    const md = [
      '# t', //                                        1
      '', //                                           2
      '<!-- docs-test: skip (reason: a diagram) -->', // 3
      '```', //                                        4
      'a --> b', //                                    5
      '```', //                                        6
      '', //                                           7
      '- step:', //                                    8
      '', //                                           9
      '  ~~~sh title', //                              10
      '  ./bin/aegis ps   # list', //                  11
      '  ~~~', //                                      12
      '', //                                           13
      '<!-- docs-test: skip -->', //                   14
      '', //                                           15
      '    indented', //                               16
    ].join('\n');
    expect(extractBlocks('x.md', md)).toEqual([
      { file: 'x.md', line: 4, lang: '', content: 'a --> b\n', marker: { kind: 'skip', reason: 'a diagram' } },
      { file: 'x.md', line: 10, lang: 'sh', content: './bin/aegis ps   # list\n' },
      {
        file: 'x.md',
        line: 16,
        lang: '',
        content: 'indented\n',
        marker: { kind: 'invalid', text: '<!-- docs-test: skip -->', why: expect.stringContaining('expected') as string },
      },
    ]);
    expect(parseMarker('<!-- docs-test: skip (reason: ) -->')).toEqual({
      kind: 'invalid',
      text: expect.any(String),
      why: 'a skip needs a reason',
    });
    expect(splitComment(`./bin/aegis run -- sh -c 'echo #1' # note`)).toEqual({
      command: `./bin/aegis run -- sh -c 'echo #1'`,
      comment: 'note',
    });
    expect(splitComment('curl http://x/#frag')).toEqual({ command: 'curl http://x/#frag', comment: '' });
  });

  it("checks a `const x = …; // VALUE` comment's value, and leaves prose comments alone", () => {
    const { code, checks } = withStatedValues("const a = f(); // { n: 1, s: 'x\\n' }\nconst b = g(); // the answer\n");
    expect(checks).toEqual(["a is { n: 1, s: 'x\\n' }"]);
    expect(code).toContain("docsAssert.deepStrictEqual(a, { n: 1, s: 'x\\n' }");
    expect(code).not.toContain('deepStrictEqual(b');
  });

  it('fails a block that nothing runs and nothing marks, naming its file and line', () => {
    const at = (lang: string, content: string, marker?: DocBlock['marker']): Plan =>
      plan({ file: 'x.md', line: 7, lang, content, ...(marker ? { marker } : {}) });
    expect(at('yaml', 'a: 1\n')).toMatchObject({ kind: 'broken', why: expect.stringMatching(/^x\.md:7: no runner/) as string });
    expect(at('sh', './bin/aegis ps\nrm -rf /tmp/x\n')).toMatchObject({
      kind: 'broken',
      why: expect.stringMatching(/^x\.md:9: `rm -rf/) as string,
    });
    expect(at('sh', './bin/aegis ps && rm -rf /tmp/x\n')).toMatchObject({ kind: 'broken' });
    expect(at('sh', './bin/aegis ps && ./bin/aegis logs x | head -1\n')).toMatchObject({ kind: 'shell' });
    expect(at('ts', 'console.log(1)\n')).toMatchObject({ kind: 'broken' });
    expect(at('yaml', 'a: 1\n', { kind: 'skip', reason: 'config' })).toEqual({ kind: 'skip', reason: 'config' });
  });
});

for (const file of [...new Set(blocks.map((b) => b.file))]) {
  describe(file, () => {
    for (const block of blocks.filter((b) => b.file === file)) {
      const where = `${block.file}:${block.line}`;
      const p = plan(block);
      if (p.kind === 'skip') {
        note(`  ${where}: skipped: ${p.reason}`, where);
        it.skip(`${where} is not run: ${p.reason}`, () => undefined);
      } else if (p.kind === 'broken') {
        note(`  ${where}: FAILS: ${p.why}`, where);
        it(`${where} is run by this test or marked as not runnable`, () => {
          throw new Error(p.why);
        });
      } else if (p.kind === 'shell') {
        it(`${where}: every line exits 0, run in order as a reader would`, () => runShellBlock(where, p.lines), 900_000);
      } else {
        it(`${where}: runs with node against the daemon and leaves no sandbox`, () => runSdkBlock(where, block, p.typescript), 600_000);
        if (p.typescript && /\bawait using\b/.test(block.content)) {
          const reason = nativeAwaitUsing()
            ? ''
            : `this node (${process.version}) has no native \`await using\` (Node 24+ has); the tsc-compiled run above covers the code`;
          if (reason) note(`  ${where} on native \`await using\`: skipped: ${reason}`, where);
          it.skipIf(reason !== '')(
            `${where} runs as plain JavaScript on a node with native \`await using\`${reason ? ` (not run: ${reason})` : ''}`,
            () => runSdkBlock(`${where} (native)`, block, false),
            600_000,
          );
        }
      }
    }
  });
}

async function runShellBlock(where: string, lines: { line: ShellLine; rule?: LineRule }[]): Promise<void> {
  current = where;
  note(`  ${where}: shell, line by line:`);
  const aegis = lines.filter((l) => !l.rule?.skip && (isAegisLine(l.line.command) || /aegisd/.test(l.line.command)));
  const startsDaemon = aegis.some((l) => /^(\.\/bin\/)?aegisd\b|^(\.\/bin\/)?aegis up\b/.test(l.line.command));
  if (startsDaemon) await stopDaemon();
  else if (aegis.length > 0) await ensureDaemon();
  for (const { line, rule } of lines) {
    const at = `${where.split(':')[0] ?? ''}:${line.line}`;
    if (rule?.skip) {
      note(`    skipped  ${line.command}   (${rule.skip})`);
      continue;
    }
    let ranAs: string | void;
    try {
      ranAs = rule?.run ? await rule.run(line, ctx) : await runAegisLine(line, ctx);
    } catch (err) {
      note(`    FAILED   ${line.command}`);
      throw new Error(`${at}: \`${line.text}\`: ${(err as Error).message}`, { cause: err });
    }
    note(ranAs && ranAs !== line.command ? `    ran as   ${ranAs}   (${rule?.how ?? ''})` : `    ran      ${line.command}`);
  }
}

async function runAegisLine(line: ShellLine, { d }: Ctx): Promise<void> {
  const r = await bash(line.command, { env: lineEnv(d), timeoutMs: 300_000 });
  expect(r.code, `exit status; stderr:\n${r.stderr}`).toBe(0);
  const expected = EXPECTED_STDOUT.find(([re]) => re.test(line.command))?.[1];
  if (expected !== undefined) expect(r.stdout).toBe(expected);
}

async function runSdkBlock(where: string, block: DocBlock, typescript: boolean): Promise<void> {
  current = `${block.file}:${block.line}`;
  const how = typescript
    ? 'type-checked and compiled by tsc'
    : TS_LANGS.has(block.lang)
      ? 'types stripped, `await using` kept'
      : 'as written';
  note(`  ${where}: ${how}, run with node ${process.version} against the daemon:`);
  await ensureDaemon();
  const project = sdkProject();
  for (const [, ref] of block.content.matchAll(/\bimage:\s*'([^']+)'/g)) await provideImage(ref ?? '');
  const { code, checks } = withStatedValues(block.content);
  const name = `block-${block.line}${typescript ? '' : '-js'}`;
  let file = path.join(project, `${name}.mjs`);
  if (typescript) {
    const source = path.join(project, `${name}.mts`);
    writeFileSync(source, code);
    file = compileTypeScript(source);
  } else if (TS_LANGS.has(block.lang)) {
    const options = { compilerOptions: { target: ts.ScriptTarget.ESNext, module: ts.ModuleKind.ESNext } };
    writeFileSync(file, ts.transpileModule(code, options).outputText);
  } else {
    writeFileSync(file, code);
  }
  const r = await bash(`node ${file}`, { cwd: project, env: lineEnv(d), timeoutMs: 300_000 });
  expect(r.code, `${where}: node exited ${r.code}\nstdout:\n${r.stdout}\nstderr:\n${r.stderr}`).toBe(0);
  for (const [re, check] of SDK_EXPECTED) if (re.test(block.content)) check(r.stdout);
  await until(async () => (await d.client.listInstances({ all: true })).length === 0, 30_000, `${where} to leave no sandbox`);
  for (const c of checks) note(`    checked  ${c}`);
  note(`    exit 0, no sandbox left${r.stdout ? `; printed ${JSON.stringify(r.stdout)}` : ''}`);
}

// ---- helpers ----------------------------------------------------------------------------------

interface Bash {
  code: number;
  stdout: string;
  stderr: string;
}

function bash(command: string, options: { cwd?: string; env: NodeJS.ProcessEnv; timeoutMs?: number }): Promise<Bash> {
  return new Promise((resolve) =>
    execFile(
      'bash',
      ['-c', command],
      { cwd: options.cwd ?? ROOT, env: options.env, timeout: options.timeoutMs ?? 120_000, maxBuffer: 64 << 20 },
      (err, stdout, stderr) => resolve({ code: err ? (typeof err.code === 'number' ? err.code : 1) : 0, stdout, stderr }),
    ),
  );
}

/** The daemon's environment (AEGIS_HOME and the guest artifacts), `aegis` on PATH, npm offline and quiet. */
function lineEnv(daemon: TestDaemon): NodeJS.ProcessEnv {
  return {
    ...daemon.env,
    PATH: `${path.join(ROOT, 'bin')}:${process.env['PATH'] ?? ''}`,
    npm_config_offline: 'true',
    npm_config_audit: 'false',
    npm_config_fund: 'false',
    npm_config_update_notifier: 'false',
  };
}

async function daemonPid(daemon: TestDaemon): Promise<number | undefined> {
  return daemon.client.status().then(
    (s) => s.pid,
    () => undefined,
  );
}

async function ensureDaemon(): Promise<void> {
  if ((await daemonPid(d)) === undefined) await d.start();
}

/** Before a block that starts the daemon itself. */
async function stopDaemon(): Promise<void> {
  const pid = await daemonPid(d);
  if (pid === undefined) return;
  if (pid === d.pid) await d.stop();
  else await stopPid(pid);
}

async function stopPid(pid: number): Promise<void> {
  const alive = (): boolean => {
    try {
      process.kill(pid, 0);
      return true;
    } catch {
      return false;
    }
  };
  process.kill(pid, 'SIGTERM');
  await until(() => !alive(), 10_000, `aegisd (pid ${pid}) to stop`).catch(() => alive() && process.kill(pid, 'SIGKILL'));
}

const pushed = new Set<string>();
async function registryHost(): Promise<string> {
  registry ??= await startRegistry();
  return registry.host;
}

const provided = new Set<string>();
/** Makes an image an SDK example names available under that name, from IMAGE_STAND_INS. */
async function provideImage(ref: string): Promise<void> {
  if (provided.has(ref)) return;
  const standIn = IMAGE_STAND_INS[ref];
  if (!standIn) throw new Error(`the example names image ${ref}, which has no stand-in in IMAGE_STAND_INS`);
  const image = await standIn.image();
  const archive = path.join(work, `${ref.replace(/[^a-z0-9]+/gi, '-')}.tar`);
  await exportDockerArchive(image.layoutDir, image.ref, archive, ref);
  const r = await d.cli(['image', 'import', archive, '--name', ref], { timeoutMs: 300_000 });
  expect(r.code, `aegis image import ${ref}: ${r.stderr}`).toBe(0);
  provided.add(ref);
  note(`    (image ${ref}: ${standIn.why})`);
}

/**
 * `const x = …; // VALUE`: the comment states x's value, so the test checks it (deepStrictEqual,
 * right after that line). Comments that are not a JavaScript value are left alone.
 */
function withStatedValues(content: string): { code: string; checks: string[] } {
  const checks: string[] = [];
  const lines = content.split('\n').map((line) => {
    const m = /^(\s*)const (\w+) = .*;\s*\/\/ (.+)$/.exec(line);
    if (!m) return line;
    const [, indent = '', name = '', stated = ''] = m;
    try {
      new Function(`return (${stated});`);
    } catch {
      return line;
    }
    checks.push(`${name} is ${stated}`);
    return `${line}\n${indent}docsAssert.deepStrictEqual(${name}, ${stated}, ${JSON.stringify(`the doc says ${name} is ${stated}`)});`;
  });
  if (checks.length === 0) return { code: content, checks };
  return { code: `import docsAssert from 'node:assert/strict';\n${lines.join('\n')}`, checks };
}

/** A reader's project: package.json of an ES module, @aegis/sdk resolving to this checkout's package. */
function sdkProject(): string {
  const dir = path.join(work, 'sdk-project');
  if (!existsSync(dir)) {
    mkdirSync(path.join(dir, 'node_modules/@aegis'), { recursive: true });
    writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name: 'docs-examples', private: true, type: 'module' }));
    symlinkSync(path.join(ROOT, 'packages/sdk'), path.join(dir, 'node_modules/@aegis/sdk'));
  }
  return dir;
}

/** tsc as the reader runs it (strict, Node's module resolution, node's types): errors fail the block. */
function compileTypeScript(source: string): string {
  const program = ts.createProgram([source], {
    target: ts.ScriptTarget.ES2022,
    module: ts.ModuleKind.NodeNext,
    moduleResolution: ts.ModuleResolutionKind.NodeNext,
    lib: ['lib.es2023.d.ts', 'lib.esnext.disposable.d.ts'],
    strict: true,
    skipLibCheck: true,
    typeRoots: [path.join(ROOT, 'node_modules/@types')],
    types: ['node'],
  });
  const emitted = program.emit();
  const diagnostics = [...ts.getPreEmitDiagnostics(program), ...emitted.diagnostics];
  if (diagnostics.length > 0) {
    const host = { getCanonicalFileName: (f: string) => f, getCurrentDirectory: () => path.dirname(source), getNewLine: () => '\n' };
    throw new Error(`tsc:\n${ts.formatDiagnostics(diagnostics, host)}`);
  }
  return source.replace(/\.mts$/, '.mjs');
}

/** Whether this node parses `await using` itself. */
function nativeAwaitUsing(): boolean {
  try {
    new Function('return async () => { await using x = null; }');
    return true;
  } catch {
    return false;
  }
}

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = (server.address() as net.AddressInfo).port;
  await new Promise((resolve) => server.close(resolve));
  return port;
}
