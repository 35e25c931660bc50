// From spec/guest-rpc.schema.json, the one description of the guest contract, writes
// src/generated/guest-rpc.ts (the schema as a constant, and the TypeScript types of every
// params, result and event) and the method and notification reference in spec/guest-rpc.md.
// `--check` writes nothing and fails when either is stale (npm run lint runs it).
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const ROOT = new URL('../', import.meta.url);
const SCHEMA = new URL('spec/guest-rpc.schema.json', ROOT);
const TS_OUT = new URL('packages/protocol/src/generated/guest-rpc.ts', ROOT);
const DOC = new URL('spec/guest-rpc.md', ROOT);
const BEGIN = '<!-- BEGIN generated from guest-rpc.schema.json by `npm run generate -w @aegis/protocol`: edit the schema, not this -->';
const END = '<!-- END generated -->';

const doc = JSON.parse(readFileSync(SCHEMA, 'utf8'));
const defs = doc.$defs;
const cap = (s) => s[0].toUpperCase() + s.slice(1);
const refName = (s) => /^#\/\$defs\/(\w+)$/.exec(s.$ref)?.[1];
const resolve = (s) => (s.$ref ? resolve(defs[refName(s)]) : s);
const isEmpty = (s) => {
  const r = resolve(s);
  return r.type === 'object' && !r.properties && !r.allOf && r.additionalProperties === false;
};
/** Defs that get a name of their own in TypeScript: objects and enums; the rest is inlined. */
const named = (name) => (defs[name].type === 'object' && !isEmpty(defs[name]) ? true : defs[name].enum !== undefined);

/** The fields of an object schema, its allOf parts folded in. */
function fields(schema) {
  const s = resolve(schema);
  const out = [];
  for (const part of s.allOf ?? []) out.push(...fields(part));
  const required = new Set(s.required ?? []);
  for (const [name, f] of Object.entries(s.properties ?? {})) out.push({ name, schema: f, required: required.has(name) });
  // A later part's required list can make an earlier part's field required.
  return out.map((f) => ({ ...f, required: f.required || required.has(f.name) }));
}

// ---- checks the parsers rely on -----------------------------------------------------------

const problems = [];
const closed = (s) => {
  const r = resolve(s);
  return r.additionalProperties === false || r.unevaluatedProperties === false || isEmpty(r);
};
/** Every object closed; with `bounded` (what the guest sends), every string and array bounded too. */
function check(schema, where, bounded) {
  const s = schema.$ref ? resolve(schema) : schema;
  const types = [s.type].flat();
  if (types.includes('object') || s.allOf) {
    if (!closed(s) && typeof s.additionalProperties !== 'object') problems.push(`${where}: an object that does not refuse unknown fields`);
    if (typeof s.additionalProperties === 'object') check(s.additionalProperties, `${where}{}`, bounded);
    for (const f of fields(s)) check(f.schema, `${where}.${f.name}`, bounded);
  }
  if (types.includes('array')) {
    if (bounded && s.maxItems === undefined) problems.push(`${where}: an array the guest sends with no maxItems`);
    check(s.items, `${where}[]`, bounded);
  }
  if (types.includes('string') && bounded && s.maxLength === undefined && s.pattern === undefined) {
    problems.push(`${where}: a string the guest sends with no maxLength or pattern`);
  }
}
for (const [m, spec] of Object.entries(doc.methods)) {
  check(spec.params, `${m} params`, false);
  check(spec.result, `${m} result`, true);
}
for (const [e, spec] of Object.entries(doc.events)) check(spec.params, e, true);
if (problems.length > 0) {
  console.error(`spec/guest-rpc.schema.json:\n  ${problems.join('\n  ')}`);
  process.exit(1);
}

// ---- TypeScript ---------------------------------------------------------------------------

const comment = (text, indent) => (text ? `${indent}/** ${text.replaceAll('*/', '*\\/')} */\n` : '');

function tsType(schema, indent) {
  if (schema.$ref) {
    const name = refName(schema);
    return named(name) ? name : tsType(defs[name], indent);
  }
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(' | ');
  if (schema.const !== undefined) return JSON.stringify(schema.const);
  const types = [schema.type].flat().filter((t) => t !== undefined);
  const nullable = types.includes('null');
  const base = types.filter((t) => t !== 'null')[0];
  let t;
  if (base === 'object' || (base === undefined && schema.allOf)) t = objectType(schema, indent);
  else if (base === 'array') t = `${tsType(schema.items, indent)}[]`;
  else if (base === 'string') t = 'string';
  else if (base === 'integer') t = 'number';
  else if (base === 'boolean') t = 'boolean';
  else t = 'null';
  return nullable && t !== 'null' ? `${t} | null` : t;
}

function body(schema, own, indent) {
  const lines = own.map(
    (f) =>
      `${comment(f.schema.description ?? resolveDescription(f.schema), `${indent}  `)}${indent}  ${f.name}${f.required || f.schema.default !== undefined ? '' : '?'}: ${tsType(f.schema, `${indent}  `)};`,
  );
  return `{\n${lines.join('\n')}\n${indent}}`;
}
const resolveDescription = (s) => (s.$ref && !named(refName(s)) ? defs[refName(s)].description : undefined);

function objectType(schema, indent) {
  if (typeof schema.additionalProperties === 'object') return `Record<string, ${tsType(schema.additionalProperties, indent)}>`;
  if (isEmpty(schema)) return 'Record<string, never>';
  const bases = (schema.allOf ?? []).map((p) => tsType(p, indent));
  const required = new Set(schema.required ?? []);
  const own = Object.entries(schema.properties ?? {}).map(([name, f]) => ({ name, schema: f, required: required.has(name) }));
  if (own.length === 0) return bases.join(' & ');
  return [...bases, body(schema, own, indent)].join(' & ');
}

/** A named declaration: an interface (extending its allOf parts) where it can be one. */
function declare(name, schema, description) {
  const head = comment(description ?? schema.description, '');
  if (schema.$ref && refName(schema) === name) return '';
  const plainObject = (schema.type === 'object' || (schema.type === undefined && schema.allOf)) && !schema.additionalProperties?.type;
  const own = Object.entries(schema.properties ?? {});
  const bases = (schema.allOf ?? []).map((p) => tsType(p, ''));
  if (plainObject && !isEmpty(schema) && own.length > 0) {
    const required = new Set(schema.required ?? []);
    const fieldsOwn = own.map(([n, f]) => ({ name: n, schema: f, required: required.has(n) }));
    return `${head}export interface ${name}${bases.length ? ` extends ${bases.join(', ')}` : ''} ${body(schema, fieldsOwn, '')}\n`;
  }
  if (plainObject && own.length === 0 && bases.length === 1 && bases[0] === name) return '';
  return `${head}export type ${name} = ${tsType(schema, '')};\n`;
}

let ts = `/**
 * This file was generated from spec/guest-rpc.schema.json by scripts/guest-rpc.mjs
 * (\`npm run generate -w @aegis/protocol\`). Do not make direct changes to the file.
 */

/** The schema itself: the parsers in guest.ts are driven by it. */
export const guestRpcSchema = ${JSON.stringify(doc, null, 2)} as const;

`;
for (const name of Object.keys(defs)) if (named(name)) ts += `${declare(name, defs[name])}\n`;
for (const [m, spec] of Object.entries(doc.methods)) {
  ts += declare(`${cap(m)}Params`, spec.params, spec.description);
  ts += `${declare(`${cap(m)}Result`, spec.result)}\n`;
}
for (const [e, spec] of Object.entries(doc.events)) {
  const d = declare(`${cap(e)}Event`, spec.params, spec.description);
  if (d) ts += `${d}\n`;
}
ts += `/** Every request the host sends, with what the guest answers. */\nexport interface GuestMethods {\n${Object.keys(doc.methods)
  .map((m) => `  ${m}: { params: ${cap(m)}Params; result: ${cap(m)}Result };`)
  .join('\n')}\n}\n`;
ts += `\n/** Every notification the guest sends. */\nexport interface GuestEvents {\n${Object.keys(doc.events)
  .map((e) => `  ${e}: ${cap(e)}Event;`)
  .join('\n')}\n}\n`;

// ---- the reference in spec/guest-rpc.md ---------------------------------------------------

/** A schema in the doc's compact notation: `{execId?, signal, group?}`, `command[]`, `env{}`. */
function shape(schema) {
  const s = resolve(schema);
  if (isEmpty(s)) return '{}';
  if (s.enum) return s.enum.join('\\|');
  const types = [s.type].flat();
  if (typeof s.additionalProperties === 'object') return '{}';
  if (types.includes('object') || s.allOf) {
    const parts = fields(s).map((f) => {
      const r = resolve(f.schema);
      const ft = [r.type].flat();
      const opt = f.required || f.schema.default !== undefined ? '' : '?';
      const orNull = ft.includes('null') ? ' \\| null' : '';
      if (ft.includes('array')) return `${f.name}${opt}: ${shape(r.items)}[]`.replace(/: (\w+)\[\]$/, '[]');
      if (typeof r.additionalProperties === 'object') return `${f.name}{}${opt}`;
      if (r.enum) return `${f.name}${opt}: ${shape(r)}`;
      if (ft.includes('object') || r.allOf) return `${f.name}${opt}: ${shape(r)}${orNull}`;
      if (r.contentEncoding === 'base64') return `${f.name}${opt}: base64`;
      return `${f.name}${opt}${orNull}`;
    });
    return `{${parts.join(', ')}}`;
  }
  return types.filter((t) => t !== 'null').join('\\|');
}

/** Each field with its type, bounds and meaning. */
function fieldList(schema, prefix = '') {
  const out = [];
  for (const f of fields(schema)) {
    const r = resolve(f.schema);
    const types = [r.type].flat().filter(Boolean);
    const bounds = [];
    if (r.minimum !== undefined && r.maximum !== undefined) bounds.push(`${r.minimum}..${r.maximum}`);
    else if (r.minimum !== undefined) bounds.push(`≥ ${r.minimum}`);
    else if (r.maximum !== undefined) bounds.push(`≤ ${r.maximum}`);
    if (r.maxLength !== undefined) bounds.push(`≤ ${r.maxLength} chars`);
    if (r.minItems !== undefined) bounds.push(`≥ ${r.minItems} items`);
    if (r.maxItems !== undefined) bounds.push(`≤ ${r.maxItems} items`);
    if (r.pattern !== undefined) bounds.push(`\`${r.pattern}\``);
    if (r.contentEncoding) bounds.push(r.contentEncoding);
    if (f.schema.default !== undefined || r.default !== undefined)
      bounds.push(`default \`${JSON.stringify(f.schema.default ?? r.default)}\``);
    const type = r.enum ? r.enum.join(' \\| ') : types.join(' \\| ') || 'object';
    const description = f.schema.description ?? r.description;
    const name = `${prefix}${f.name}`;
    out.push(`\`${name}\`${f.required ? '' : '?'} (${[type, ...bounds].join(', ')})${description ? `: ${description}` : ''}`);
    if ((types.includes('object') || r.allOf) && typeof r.additionalProperties !== 'object' && !isEmpty(r))
      out.push(...fieldList(r, `${name}.`));
    if (types.includes('array') && resolve(r.items).type === 'object') out.push(...fieldList(r.items, `${name}[].`));
  }
  return out;
}

const cell = (s) => s.replaceAll('|', '\\|').replaceAll('\n', ' ');
let md = `${BEGIN}\n\nProtocol version ${doc.version} (the \`version\` of \`ready\` and \`health\`).\n\n`;
md += '| Request (host → guest) | Params | Result | Errors | What it does |\n|---|---|---|---|---|\n';
for (const [m, spec] of Object.entries(doc.methods)) {
  const errors = spec.errors.map(([code, when]) => (when ? `\`${code}\` (${when})` : `\`${code}\``)).join(', ');
  md += `| \`${m}\` | \`${shape(spec.params)}\` | \`${shape(spec.result)}\` | ${cell(errors)} | ${cell(spec.description)} |\n`;
}
md += '\n| Notification (guest → host) | Params | Meaning |\n|---|---|---|\n';
for (const [e, spec] of Object.entries(doc.events)) md += `| \`${e}\` | \`${shape(spec.params)}\` | ${cell(spec.description)} |\n`;
md += '\nFields, with the bounds the parsers enforce (an unknown field is refused everywhere):\n\n';
const section = (title, schema) => {
  const list = fieldList(schema);
  if (list.length > 0) md += `- ${title}:\n${list.map((l) => `  - ${l}\n`).join('')}`;
};
for (const [m, spec] of Object.entries(doc.methods)) {
  section(`\`${m}\` params`, spec.params);
  section(`\`${m}\` result`, spec.result);
}
for (const [e, spec] of Object.entries(doc.events)) section(`\`${e}\``, spec.params);
md += `\n${END}`;

const current = readFileSync(DOC, 'utf8');
const start = current.indexOf(BEGIN);
const end = current.indexOf(END);
if (start === -1 || end === -1) {
  console.error(`${fileURLToPath(DOC)}: the markers around the generated reference are missing`);
  process.exit(1);
}
const newDoc = current.slice(0, start) + md + current.slice(end + END.length);

const outputs = [
  [TS_OUT, ts],
  [DOC, newDoc],
];
if (process.argv.includes('--check')) {
  const stale = outputs.filter(([file, text]) => {
    try {
      return readFileSync(file, 'utf8') !== text;
    } catch {
      return true;
    }
  });
  for (const [file] of stale) console.error(`${fileURLToPath(file)} is stale: run npm run generate -w @aegis/protocol`);
  process.exit(stale.length > 0 ? 1 : 0);
}
for (const [file, text] of outputs) writeFileSync(file, text);
