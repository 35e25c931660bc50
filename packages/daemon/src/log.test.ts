import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { escapeForLog } from './log.js';

/** C0, DEL, C1, line/paragraph separators, bidi embeddings, overrides and isolates. */
function unsafe(ch: string): boolean {
  const c = ch.codePointAt(0) as number;
  return c < 0x20 || (c >= 0x7f && c <= 0x9f) || (c >= 0x2028 && c <= 0x202e) || (c >= 0x2066 && c <= 0x2069);
}

describe('escapeForLog', () => {
  it('guest strings never reach the daemon log raw: newlines, carriage returns and ESC are escaped', () => {
    expect(escapeForLog('a\nb\rc\td\x1b[31me\x00\x7f\x9b')).toBe('a\\nb\\rc\\td\\x1b[31me\\x00\\x7f\\x9b');
    expect(escapeForLog('back\\slash')).toBe('back\\\\slash');
    expect(escapeForLog('rtl\u202eoverride\u2028sep\u2066iso\ufeff')).toBe('rtl\\u202eoverride\\u2028sep\\u2066iso\\ufeff');
    expect(escapeForLog('lone \ud800 surrogate')).toBe('lone \\ud800 surrogate');
    expect(escapeForLog('plain text, ünïcödé and 😀 stay')).toBe('plain text, ünïcödé and 😀 stay');
  });

  it('cuts long text with a marker that says how much is left out, without splitting a character', () => {
    expect(escapeForLog('x'.repeat(300))).toBe(`${'x'.repeat(200)}…[100 more chars]`);
    expect(escapeForLog('abc', 2)).toBe('ab…[1 more chars]');
    // An escape is not cut in half, nor is a surrogate pair.
    expect(escapeForLog('ab\n', 3)).toBe('ab…[1 more chars]');
    expect(escapeForLog('a😀', 2)).toBe('a…[2 more chars]');
    // Bounded by maxChars whatever the input's size.
    expect(escapeForLog('\n'.repeat(10_000_000), 10).length).toBeLessThan(40);
  });

  it('for any input: one line of printable text, no longer than maxChars plus the marker', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary', maxLength: 400 }), fc.integer({ min: 0, max: 300 }), (s, max) => {
        const out = escapeForLog(s, max);
        expect([...out].filter(unsafe)).toEqual([]);
        const marker = /…\[\d+ more chars\]$/.exec(out);
        expect(out.length - (marker?.[0].length ?? 0)).toBeLessThanOrEqual(max);
        if (!marker) expect(JSON.parse(`"${out.replace(/\\x([0-9a-f]{2})/g, '\\u00$1')}"`)).toBe(s);
      }),
    );
  });
});
