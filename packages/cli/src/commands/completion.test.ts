import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Command, Option } from 'commander';
import { completionCommand, completionScript } from './completion.js';
import { doctorCommand } from './system/doctor.js';

/** A command tree of aegis's shapes: nouns with verbs and aliases, instance arguments, a workload command, choices. */
function program(): Command {
  const p = new Command('aegis').version('0.1.0');
  const instance = new Command('instance').description('manage instances');
  instance.addCommand(new Command('list').alias('ls').description('list instances').option('-a, --all').option('--json'));
  instance.addCommand(new Command('info').argument('<instance>'));
  p.addCommand(instance);
  p.addCommand(
    new Command('exec')
      .description('run a command in a running instance')
      .option('-e, --env <KEY=VALUE>')
      .addOption(new Option('--network <mode>').choices(['none', 'user']))
      .argument('<instance>')
      .argument('<command...>'),
  );
  p.addCommand(new Command('rm').argument('<instance...>').option('-f, --force'));
  p.addCommand(doctorCommand());
  p.addCommand(completionCommand());
  return p;
}

const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-completion-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** An `aegis` whose `ps -a --json` prints these instances as the real one does (JSON.stringify, 2 spaces). */
const fakeAegis = path.join(dir, 'aegis');
writeFileSync(
  fakeAegis,
  `#!/bin/sh\ncat <<'EOF'\n${JSON.stringify(
    [
      { id: '0123456789abcdef', handle: 'web-1', command: ['sleep', '1'] },
      { id: 'fedcba', handle: 'db' },
    ],
    null,
    2,
  )}\nEOF\n`,
);
chmodSync(fakeAegis, 0o755);

describe('aegis completion bash', () => {
  const script = path.join(dir, 'aegis.bash');
  writeFileSync(script, completionScript(program(), 'bash'));

  /** What bash offers for the last of `words` (the word being completed), from the sourced script. */
  function complete(...words: string[]): string[] {
    const out = execFileSync(
      'bash',
      [
        '--norc',
        '--noprofile',
        '-c',
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _aegis; printf "%s\\n" "${COMPREPLY[@]}"',
        'bash',
        script,
        fakeAegis,
        ...words,
      ],
      { encoding: 'utf8' },
    );
    return out.split('\n').filter((w) => w !== '');
  }

  it('is a valid bash script (bash -n) that registers _aegis for aegis', () => {
    expect(spawnSync('bash', ['-n', script]).status).toBe(0);
    expect(execFileSync('bash', ['--norc', '-c', 'source "$1"; complete -p aegis', 'bash', script], { encoding: 'utf8' })).toBe(
      'complete -o default -F _aegis aegis\n',
    );
  });

  it('completes a command from its first letters: inst offers instance', () => {
    expect(complete('inst')).toEqual(['instance']);
    expect(complete('')).toEqual(['instance', 'exec', 'rm', 'doctor', 'completion', 'help']);
  });

  it('completes subcommands with their aliases, and options of the command typed', () => {
    expect(complete('instance', 'l')).toEqual(['list', 'ls']);
    expect(complete('instance', 'ls', '--')).toEqual(['--all', '--json', '--help']);
    expect(complete('doctor', '--j')).toEqual(['--json']);
  });

  it("completes an option's fixed values and an argument's, after a space or an =", () => {
    expect(complete('exec', '--network', '')).toEqual(['none', 'user']);
    expect(complete('exec', '--network', '=', 'u')).toEqual(['user']);
    expect(complete('completion', '')).toEqual(['bash', 'zsh']);
    expect(complete('help', 'ins')).toEqual(['instance']);
  });

  it('completes instance handles from aegis ps -a --json, past option values', () => {
    expect(complete('exec', '-e', 'A=1', '')).toEqual(['web-1', 'db']);
    expect(complete('rm', '-f', 'db', 'w')).toEqual(['web-1']);
    expect(complete('instance', 'info', 'd')).toEqual(['db']);
  });

  it("leaves the workload's words to the shell: after --, and after the instance of exec", () => {
    expect(complete('exec', 'web-1', '--', '')).toEqual([]);
    expect(complete('exec', 'web-1', 'ls', '-')).toEqual([]);
    expect(complete('exec', '-e', '')).toEqual([]);
  });
});

const zsh = spawnSync('zsh', ['--version']).status === 0;

describe('aegis completion zsh', () => {
  const script = path.join(dir, 'aegis.zsh');
  writeFileSync(script, completionScript(program(), 'zsh'));

  it('is a zsh completion function for aegis', () => {
    const text = completionScript(program(), 'zsh');
    expect(text).toMatch(/^#compdef aegis\n/);
    expect(text).toContain("'instance:manage instances'");
    expect(text).toContain('compdef _aegis aegis');
  });

  /**
   * Types `line` and TAB into an interactive zsh (in a pseudo-terminal, zsh's zpty) with
   * compinit and the script loaded, then Enter; `aegis` there is a function that prints the
   * words it ran with (or, for `ps -a --json`, instances as the real one does).
   */
  function completedLine(line: string): string {
    const driver = `
zmodload zsh/zpty
zpty z 'zsh -f -i'
zpty -w z 'PS1="> "; autoload -U compinit && compinit -u -D'
zpty -w z ${shq(`aegis() { if [[ $1 == ps ]]; then cat ${fakeAegis}; else print -r -- "RAN""<$*>"; fi }`)}
zpty -w z ${shq(`source ${script}`)}
zpty -n -w z ${shq(line)}$'\\t\\r'
local all='' chunk
integer i
for (( i = 0; i < 300; i++ )); do
  while zpty -r -t z chunk; do all+=$chunk; done
  [[ $all == *RAN\\<*\\>* ]] && break
  sleep 0.1
done
zpty -d z
all=\${all##*RAN<}
print -r -- "\${all%%>*}"
`;
    return execFileSync('zsh', ['-f', '-c', driver], { encoding: 'utf8', timeout: 60_000 }).trim();
  }
  const shq = (s: string): string => `'${s.replaceAll("'", `'\\''`)}'`;

  it.skipIf(!zsh)('completes in a real interactive zsh: inst offers instance, exec w offers an instance handle', () => {
    expect(completedLine('aegis inst')).toBe('instance');
    expect(completedLine('aegis exec w')).toBe('exec web-1');
    expect(completedLine('aegis exec --network u')).toBe('exec --network user');
  });
  // Say so when zsh is absent rather than pass silently.
  it.skipIf(zsh)('completes in a real interactive zsh (skipped: zsh is not installed; apt-get install zsh)', () => {});
});
