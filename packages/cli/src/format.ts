/**
 * The part of Go's text/template that `docker ps --format` and `docker inspect -f` are used
 * with: `{{.Field}}`, `{{.A.B}}`, `{{json .X}}`, `{{index .Labels "k"}}`, `{{join .Cmd " "}}`,
 * a leading `table ` for a header row, and `\t` / `\n`. Anything else is refused when parsed, with
 * a pointer to `--json`, rather than printed wrong.
 */
import { InvalidArgumentError } from 'commander';

type Value = unknown;
type Action = (data: Value) => string;

export interface Template {
  /** Fills the template with one object. */
  render(data: Value): string;
  /** `table …`: the header line (each `{{.Field}}` as FIELD), else undefined. */
  header: string | undefined;
}

const SUPPORTED =
  'supported: {{.Field}}, {{.A.B}}, {{json .X}}, {{index .X "key"}}, {{join .X "sep"}}, "table "; for anything else use --json (and jq)';

/** Go's %v: strings as they are, lists as [a b], maps as map[k:v], a missing field as <no value>. */
function plain(v: Value): string {
  if (v === undefined) return '<no value>';
  if (v === null) return '<nil>';
  if (Array.isArray(v)) return `[${v.map(plain).join(' ')}]`;
  if (typeof v === 'object') {
    const entries = Object.entries(v).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `map[${entries.map(([k, x]) => `${k}:${plain(x)}`).join(' ')}]`;
  }
  return String(v);
}

function field(path: string[]): (data: Value) => Value {
  return (data) => {
    let v: Value = data;
    for (const name of path) {
      if (v === null || typeof v !== 'object' || !Object.hasOwn(v, name)) return undefined;
      v = (v as Record<string, Value>)[name];
    }
    return v;
  };
}

/** `.A.B` → ['A', 'B']; `.` → []. */
function pathOf(token: string, template: string): string[] {
  if (token === '.') return [];
  if (!/^(\.[A-Za-z_][A-Za-z0-9_]*)+$/.test(token))
    throw new InvalidArgumentError(`"${token}" in "${template}" is not a field: ${SUPPORTED}`);
  return token.slice(1).split('.');
}

function quoted(token: string | undefined, template: string): string {
  const m = token === undefined ? null : /^"((?:[^"\\]|\\.)*)"$/.exec(token);
  if (!m) throw new InvalidArgumentError(`expected a "quoted string" in "${template}": ${SUPPORTED}`);
  return JSON.parse(`"${m[1] ?? ''}"`) as string;
}

function action(body: string, template: string): { run: Action; column: string } {
  const tokens = body.trim().match(/"(?:[^"\\]|\\.)*"|\S+/g) ?? [];
  const [head, arg, extra, ...rest] = tokens;
  if (head === undefined) throw new InvalidArgumentError(`empty {{}} in "${template}"`);
  const columnOf = (p: string[]): string => (p.length === 0 ? 'VALUE' : p.map((s) => s.toUpperCase()).join('.'));
  if (head.startsWith('.') && tokens.length === 1) {
    const get = field(pathOf(head, template));
    return { run: (d) => plain(get(d)), column: columnOf(pathOf(head, template)) };
  }
  if (head === 'json' && arg !== undefined && extra === undefined) {
    const get = field(pathOf(arg, template));
    return { run: (d) => JSON.stringify(get(d) ?? null), column: columnOf(pathOf(arg, template)) };
  }
  if ((head === 'index' || head === 'join') && arg !== undefined && rest.length === 0) {
    const get = field(pathOf(arg, template));
    const s = quoted(extra, template);
    if (head === 'index') {
      return {
        run: (d) => {
          const v = get(d);
          return plain(v !== null && typeof v === 'object' && Object.hasOwn(v, s) ? (v as Record<string, Value>)[s] : undefined);
        },
        column: s.toUpperCase(),
      };
    }
    return {
      run: (d) => {
        const v = get(d);
        return Array.isArray(v) ? v.map(plain).join(s) : plain(v);
      },
      column: columnOf(pathOf(arg, template)),
    };
  }
  throw new InvalidArgumentError(`"{{${body}}}" is not supported: ${SUPPORTED}`);
}

/** Parses once (a bad template fails before anything is asked of the daemon). */
export function parseTemplate(text: string, headerNames: Record<string, string> = {}): Template {
  const isTable = text.startsWith('table ');
  const source = (isTable ? text.slice('table '.length) : text).replace(/\\t/g, '\t').replace(/\\n/g, '\n');
  const parts: (string | Action)[] = [];
  const header: string[] = [];
  let at = 0;
  for (;;) {
    const open = source.indexOf('{{', at);
    const literal = source.slice(at, open < 0 ? undefined : open);
    if (literal.includes('}}')) throw new InvalidArgumentError(`unbalanced "}}" in "${text}"`);
    parts.push(literal);
    header.push(literal);
    if (open < 0) break;
    const close = source.indexOf('}}', open + 2);
    if (close < 0) throw new InvalidArgumentError(`unclosed "{{" in "${text}"`);
    const a = action(source.slice(open + 2, close), text);
    parts.push(a.run);
    header.push(headerNames[a.column] ?? a.column);
    at = close + 2;
  }
  return {
    render: (data) => parts.map((p) => (typeof p === 'string' ? p : p(data))).join(''),
    header: isTable ? header.join('') : undefined,
  };
}
