/**
 * The daemon's own log (stderr; `aegis up` sends it to $AEGIS_HOME/aegisd.log). It records
 * lifecycle events with ids and handles only: never environment values or workload output.
 * Text that came from a guest (error messages, names) goes in only through `escapeForLog`.
 */
export interface Logger {
  info(msg: string): void;
  warn(msg: string): void;
}

export function stderrLogger(): Logger {
  const line = (level: string, msg: string): void => {
    process.stderr.write(`${new Date().toISOString()} ${level} ${msg}\n`);
  };
  return { info: (m) => line('info', m), warn: (m) => line('warn', m) };
}

/**
 * Makes untrusted text (anything a guest sent) safe to put in one log line: it cannot start a
 * line of its own, move the cursor, recolour a terminal, or reorder what a reader sees. Control
 * characters become JSON-style escapes (`\n`, `\r`, `\t`, `\\`) or `\xNN` (C0, DEL, C1: ESC is
 * `\x1b`), and line/paragraph separators, bidirectional controls, the BOM and lone surrogates
 * become `\uNNNN`. At most `maxChars` characters of escaped text are kept; the rest is replaced
 * by a marker saying how many characters (UTF-16 units) of the input were left out. Work is
 * bounded by `maxChars`, not by the input's length.
 */
export function escapeForLog(s: string, maxChars = 200): string {
  let out = '';
  let i = 0;
  while (i < s.length) {
    const cp = s.codePointAt(i) as number;
    const width = cp > 0xffff ? 2 : 1;
    const piece = escapeCodePoint(cp) ?? s.slice(i, i + width);
    if (out.length + piece.length > maxChars) break;
    out += piece;
    i += width;
  }
  return i < s.length ? `${out}…[${s.length - i} more chars]` : out;
}

const SHORT_ESCAPES: Record<number, string> = { 0x09: '\\t', 0x0a: '\\n', 0x0d: '\\r', 0x5c: '\\\\' };

function escapeCodePoint(cp: number): string | undefined {
  const short = SHORT_ESCAPES[cp];
  if (short !== undefined) return short;
  if (cp < 0x20 || (cp >= 0x7f && cp <= 0x9f)) return `\\x${cp.toString(16).padStart(2, '0')}`;
  if (
    cp === 0x061c || // Arabic letter mark
    cp === 0x200e ||
    cp === 0x200f || // LRM, RLM
    (cp >= 0x2028 && cp <= 0x202e) || // line/paragraph separators, bidi embeddings and overrides
    (cp >= 0x2066 && cp <= 0x2069) || // bidi isolates
    cp === 0xfeff ||
    (cp >= 0xd800 && cp <= 0xdfff) // a lone surrogate (a pair arrives here as one code point)
  ) {
    return `\\u${cp.toString(16).padStart(4, '0')}`;
  }
  return undefined;
}
