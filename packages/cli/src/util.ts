import { readFileSync } from 'node:fs';
import { AegisClient, AegisError, type Instance, type Stream } from '@aegis/client';
import { InvalidArgumentError } from 'commander';
import { formatDurationMs, parseDurationMs } from '@aegis/protocol';

export function client(): AegisClient {
  return new AegisClient();
}

/** Writes a chunk of guest output to our own stdout or stderr, keeping the streams apart. */
export function writeOutput(stream: Stream, base64: string): void {
  (stream === 'stdout' ? process.stdout : process.stderr).write(Buffer.from(base64, 'base64'));
}

/** Exits once stdout and stderr have been flushed. */
export function exit(code: number): never {
  let pending = 2;
  const done = (): void => {
    if (--pending === 0) process.exit(code);
  };
  process.stdout.write('', done);
  process.stderr.write('', done);
  // Keep the type honest: control never returns to the caller.
  throw new ExitSignal(code);
}

export class ExitSignal extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
  }
}

/**
 * Docker's boolean flags take `--rm`, `--rm=true` and `--rm=false` (Go's ParseBool words), never
 * a separate word: `aegis run --rm echo hi` must not eat `echo`. Rewrites `--x=false` to
 * `--no-x` and `--x=true` to `--x` before the first `--`; any other value is an error.
 */
export function normalizeBoolFlags(argv: string[], flags: string[]): string[] {
  const out: string[] = [];
  let passthrough = false;
  for (const [i, a] of argv.entries()) {
    if (passthrough || a === '--') {
      passthrough = true;
      out.push(a);
      continue;
    }
    // `--rm false` is --rm and then the command `false`, as with Docker: say so, since it reads as a value.
    if (flags.includes(a) && ['true', 'false'].includes(argv[i + 1] ?? '')) {
      process.stderr.write(
        `aegis: warning: ${a} takes no separate value: "${argv[i + 1]}" is the command (write ${a}=${argv[i + 1]} for a value)\n`,
      );
    }
    const eq = a.indexOf('=');
    const flag = eq > 0 ? a.slice(0, eq) : a;
    if (eq > 0 && flags.includes(flag)) {
      const v = a.slice(eq + 1);
      if (['1', 't', 'T', 'true', 'TRUE', 'True'].includes(v)) out.push(flag);
      else if (['0', 'f', 'F', 'false', 'FALSE', 'False'].includes(v)) out.push(`--no-${flag.slice(2)}`);
      else {
        process.stderr.write(`aegis: invalid value "${v}" for ${flag}: use ${flag}, ${flag}=true or ${flag}=false [INVALID_ARGUMENT]\n`);
        process.exit(125);
      }
    } else out.push(a);
  }
  return out;
}

/**
 * Docker's exit statuses for `run` and `exec`, whose own status is the workload's: 127 when
 * the command is not found, 126 when it cannot be executed, and for an error of Aegis itself
 * 125 (`run`, as `docker run`) or 1 (`exec`, as `docker exec`).
 */
export function failCommand(err: unknown, ownError = 125): never {
  if (err instanceof ExitSignal) throw err;
  const e = printError(err);
  const notFound = e.code === 'NOT_FOUND' && /command not found/.test(e.message);
  const cannotRun = e.code === 'INVALID_ARGUMENT' && /permission denied/.test(e.message);
  exit(notFound ? 127 : cannotRun ? 126 : ownError);
}

/**
 * The request fields a user set through a flag, so that an error names what they typed
 * (`--memory`, not `memoryMiB`). The daemon's messages name fields: it serves every client.
 */
const FIELD_FLAGS: [RegExp, string][] = [
  [/\bmemoryMiB\b/g, '--memory'],
  [/\bvcpuCount\b/g, '--cpus'],
  [/\bhandle\b/g, '--name'],
  [/\bexposes\.(\d+)\.\w+/g, '--expose #$1'],
  [/\bexposes\b/g, '--expose'],
  [/\bvolumes\.(\d+)\.\w+/g, '--volume #$1'],
  [/\bvolumes\b/g, '--volume'],
  [/\bworkdir\b/g, '--workdir'],
  [/\buser\b(?= must)/g, '--user'],
  [/\benv\.(\w+)/g, '--env $1'],
  [/\bsecrets\b/g, '--secret'],
];

/** The one-line form of every error the CLI reports: `aegis: <message> [<CODE>]`. */
export function printError(err: unknown): AegisError {
  let e = AegisError.from(err);
  if (e.code === 'INVALID_ARGUMENT' && e.message.startsWith('invalid request: ')) {
    let message = e.message.slice('invalid request: '.length);
    for (const [re, flag] of FIELD_FLAGS) message = message.replace(re, flag);
    e = new AegisError(e.code, message);
  }
  process.stderr.write(`aegis: ${e.message} [${e.code}]\n`);
  if (jsonErrors) process.stdout.write(JSON.stringify({ error: { code: e.code, message: e.message } }) + '\n');
  return e;
}

let jsonErrors = false;
/** Under --json, an error is also printed as JSON on stdout, so a script reading it sees why. */
export function errorsAsJson(on: boolean | undefined): void {
  jsonErrors = on === true;
}

/** One line on stderr, non-zero exit. */
export function fail(err: unknown): never {
  if (err instanceof ExitSignal) throw err;
  const e = printError(err);
  exit(e.code === 'INVALID_ARGUMENT' ? 2 : 1);
}

const SIZE_UNITS: Record<string, number> = { '': 1, b: 1 / (1 << 20), k: 1 / 1024, m: 1, g: 1024, t: 1024 * 1024 };

/**
 * A size flag in MiB, as Docker writes sizes: `512m`, `1g`, `1.5g`, `512mb`, `1GiB`; a bare
 * number is MiB. It must come to a whole number of MiB inside `[minMiB, maxMiB]`.
 */
export function mibParser(minMiB: number, maxMiB: number, range: string): (v: string) => number {
  return (v) => {
    const m = /^(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?$/i.exec(v.trim());
    const unit = SIZE_UNITS[m?.[2]?.toLowerCase() ?? ''];
    if (!m?.[1] || unit === undefined) throw new InvalidArgumentError(`"${v}" is not a size: use e.g. 512m, 1g or 2048 (MiB)`);
    const mib = Number(m[1]) * unit;
    if (!Number.isInteger(mib)) throw new InvalidArgumentError(`"${v}" is not a whole number of MiB`);
    if (mib < minMiB || mib > maxMiB) throw new InvalidArgumentError(`"${v}" is out of range: ${range}`);
    return mib;
  };
}

/**
 * Docker's `-m`. A bare number is MiB (Docker reads bytes, but nobody means a 512-byte VM;
 * plain MiB is what `--memory` has always taken here).
 */
export const parseMemory = mibParser(128, 65536, '128m to 64g');

/** Bytes for people: `512B`, `3.4KiB`, `12.5MiB`, `1.25GiB`. */
export function formatBytes(n: number): string {
  if (n >= 1 << 30) return `${(n / (1 << 30)).toFixed(2)}GiB`;
  if (n >= 1 << 20) return `${(n / (1 << 20)).toFixed(1)}MiB`;
  if (n >= 1024) return `${(n / 1024).toFixed(1)}KiB`;
  return `${n}B`;
}

/**
 * Docker's --env-file: `KEY=VALUE` per line (taken as is: no quotes, no expansion), a bare
 * `KEY` takes our own value, `#` comments and blank lines skipped. Repeatable; later wins.
 */
export function collectEnvFile(file: string, previous: Record<string, string> = {}): Record<string, string> {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new InvalidArgumentError(`cannot read ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`);
  }
  const out = { ...previous };
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.replace(/^\s+/, '');
    if (line === '' || line.startsWith('#')) continue;
    if (!line.includes('=') && process.env[line.trim()] === undefined) continue; // unset here: not set there either
    try {
      Object.assign(out, collectEnv(line));
    } catch (err) {
      throw new InvalidArgumentError(`${file}:${i + 1}: ${(err as Error).message}`);
    }
  }
  return out;
}

/** A duration flag (protocol's parseDurationMs): `500ms`, `90s`, `10m`, `2h`, `1d`, a bare number of seconds; `0` is none. In ms. */
export function parseDuration(v: string): number {
  try {
    return parseDurationMs(v);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** A duration in ms as parseDuration takes it, in its shortest exact spelling. */
export const formatMs = formatDurationMs;

/** Docker's -u: `name`, `uid`, `name:group`, `uid:gid`. */
export function parseUser(v: string): string {
  if (!/^[^:\s]+(:[^:\s]+)?$/.test(v)) throw new InvalidArgumentError(`"${v}": expected NAME|UID[:GROUP|GID]`);
  return v;
}

export function absolutePath(v: string): string {
  if (!v.startsWith('/')) throw new InvalidArgumentError(`"${v}" must be an absolute path in the guest`);
  return v;
}

/** Docker refuses `-it` when our stdin is not a terminal: reading it would hang or garble. */
export function checkTty(o: { interactive?: boolean; tty?: boolean }): void {
  if (o.interactive && o.tty && !process.stdin.isTTY) throw new AegisError('INVALID_ARGUMENT', 'the input device is not a TTY');
}

export function collectEnv(value: string, previous: Record<string, string> = {}): Record<string, string> {
  const eq = value.indexOf('=');
  const key = eq === -1 ? value : value.slice(0, eq);
  if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key)) throw new InvalidArgumentError(`"${value}" is not KEY=VALUE`);
  // Like docker: `--env KEY` takes KEY from our own environment.
  const val = eq === -1 ? process.env[key] : value.slice(eq + 1);
  if (val === undefined) throw new InvalidArgumentError(`${key} is not set in this environment`);
  return { ...previous, [key]: val };
}

export function integer(what: string): (v: string) => number {
  return (v) => {
    if (!/^-?\d+$/.test(v)) throw new InvalidArgumentError(`${what} must be an integer`);
    return Number(v);
  };
}

export function positiveInt(what: string, min: number, max: number): (v: string) => number {
  return (v) => {
    if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max) {
      throw new InvalidArgumentError(`${what} must be an integer from ${min} to ${max}`);
    }
    return Number(v);
  };
}

export function age(iso: string | undefined, now = Date.now()): string {
  if (!iso) return '-';
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  if (s < 86400) return `${Math.floor(s / 3600)}h`;
  return `${Math.floor(s / 86400)}d`;
}

export function table(rows: string[][]): string {
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? [];
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i] ?? 0))).join('  ')).join('\n') + '\n';
}

export function shellJoin(argv: string[]): string {
  return argv.map((a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", `'\\''`)}'`)).join(' ');
}

export function describeEnd(inst: Pick<Instance, 'state' | 'exitCode' | 'stateReason'>): number {
  if (inst.exitCode !== null) return inst.exitCode;
  process.stderr.write(`aegis: instance ${inst.state}${inst.stateReason ? `: ${inst.stateReason}` : ''}\n`);
  return 125;
}

/** With pass-through options, a `--` after a positional argument arrives as part of the command. */
export function commandArgs(argv: string[]): string[] {
  return argv[0] === '--' ? argv.slice(1) : argv;
}

/** `each` for every ref, going on past failures (each reported in one line); the results, and whether any failed. */
export async function eachRef<T>(refs: string[], each: (ref: string) => Promise<T>): Promise<{ results: T[]; failed: boolean }> {
  const results: T[] = [];
  let failed = false;
  for (const ref of refs) {
    try {
      results.push(await each(ref));
    } catch (err) {
      failed = true;
      printError(err);
    }
  }
  return { results, failed };
}

/** Prints what `each` returns for every ref, one line each; exits 1 if any failed. */
export async function forEach(refs: string[], each: (ref: string) => Promise<string>): Promise<void> {
  const { failed } = await eachRef(refs, async (ref) => {
    const line = await each(ref);
    process.stdout.write(`${line}\n`);
    return line;
  });
  if (failed) exit(1);
}
