/**
 * The code blocks of our Markdown docs, found with markdown-it (the CommonMark parser TypeDoc
 * uses), so a fence inside a list, a `~~~` fence or an indented code block is found the way a
 * reader's renderer finds it. tests/integration/docs.test.ts runs them.
 *
 * A block that is not meant to run says so in an HTML comment right before it (invisible when
 * rendered), with the reason:
 *
 *     <!-- docs-test: skip (reason: a diagram, nothing to run) -->
 */
import { existsSync, readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';

// markdown-it ships no types of its own; the little of it used here.
interface Token {
  type: string;
  info: string;
  content: string;
  map: [number, number] | null;
}
type MarkdownIt = new (options: { html: boolean }) => { parse(src: string, env: object): Token[] };
const MarkdownIt = createRequire(import.meta.url)('markdown-it') as MarkdownIt;

export interface DocBlock {
  /** Relative to the repository root, e.g. `packages/sdk/README.md`. */
  file: string;
  /** 1-based line of the opening fence (or of an indented block's first line). */
  line: number;
  /** The info string's first word (`sh`, `ts`); '' when there is none or the block is indented. */
  lang: string;
  content: string;
  /** From a `<!-- docs-test: … -->` comment right before the block. */
  marker?: Marker;
}

export type Marker = { kind: 'skip'; reason: string } | { kind: 'invalid'; text: string; why: string };

/** The docs whose examples must run: README.md, docs/*.md, packages/*\/README.md. */
export function docFiles(root: string): string[] {
  const md = (dir: string): string[] =>
    readdirSync(path.join(root, dir))
      .filter((f) => f.endsWith('.md'))
      .sort()
      .map((f) => path.join(dir, f));
  const packages = readdirSync(path.join(root, 'packages'), { withFileTypes: true })
    .filter((e) => e.isDirectory())
    .map((e) => path.join('packages', e.name, 'README.md'))
    .filter((f) => existsSync(path.join(root, f)))
    .sort();
  return ['README.md', ...md('docs'), ...packages];
}

export function extractBlocks(file: string, text: string): DocBlock[] {
  const tokens = new MarkdownIt({ html: true }).parse(text, {});
  const blocks: DocBlock[] = [];
  tokens.forEach((t, i) => {
    if ((t.type !== 'fence' && t.type !== 'code_block') || !t.map) return;
    const block: DocBlock = {
      file,
      line: t.map[0] + 1,
      lang: t.type === 'fence' ? (t.info.trim().split(/\s+/)[0] ?? '') : '',
      content: t.content,
    };
    const before = tokens[i - 1];
    const marker = before?.type === 'html_block' ? parseMarker(before.content) : undefined;
    if (marker) block.marker = marker;
    blocks.push(block);
  });
  return blocks;
}

const MARKER = /<!--\s*docs-test:([\s\S]*?)-->/;
const SKIP = /^\s*skip\s*\(\s*reason:\s*([\s\S]*?)\s*\)\s*$/;

/** `<!-- docs-test: skip (reason: …) -->`; any other docs-test comment is a mistake to report. */
export function parseMarker(html: string): Marker | undefined {
  const m = MARKER.exec(html);
  if (!m) return undefined;
  const body = m[1] ?? '';
  const skip = SKIP.exec(body);
  if (skip) {
    const reason = skip[1] ?? '';
    return reason === '' ? { kind: 'invalid', text: m[0], why: 'a skip needs a reason' } : { kind: 'skip', reason };
  }
  return { kind: 'invalid', text: m[0], why: 'expected `<!-- docs-test: skip (reason: …) -->`' };
}

export interface ShellLine {
  /** 1-based line in the doc file. */
  line: number;
  /** As written, continuation lines joined. */
  text: string;
  /** With a trailing `# comment` removed. */
  command: string;
  /** The trailing comment's text, '' when none. */
  comment: string;
}

/** The commands of a shell block: blank lines dropped, `\` continuations joined, comments split off. */
export function shellLines(block: DocBlock): ShellLine[] {
  const out: ShellLine[] = [];
  const raw = block.content.split('\n');
  for (let i = 0; i < raw.length; i++) {
    const first = i;
    let text = raw[i] ?? '';
    while (text.endsWith('\\') && i + 1 < raw.length) text = `${text.slice(0, -1)} ${(raw[++i] ?? '').trim()}`;
    if (text.trim() === '' || text.trim().startsWith('#')) continue;
    const { command, comment } = splitComment(text);
    out.push({ line: block.line + 1 + first, text, command, comment });
  }
  return out;
}

/** A `#` starts a comment where the shell would: at a word's start, outside quotes. */
export function splitComment(text: string): { command: string; comment: string } {
  let quote: string | undefined;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quote) {
      if (c === quote) quote = undefined;
      else if (c === '\\' && quote === '"') i++;
    } else if (c === "'" || c === '"') quote = c;
    else if (c === '\\') i++;
    else if (c === '#' && (i === 0 || /\s/.test(text[i - 1] ?? ''))) {
      return { command: text.slice(0, i).trim(), comment: text.slice(i + 1).trim() };
    }
  }
  return { command: text.trim(), comment: '' };
}
