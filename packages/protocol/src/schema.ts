/**
 * Parses a value against a JSON Schema of the small subset spec/guest-rpc.schema.json uses:
 * the guest contract's parsers, driven by its schema. Not ajv: the harness carries this into
 * every guest (a few hundred lines, no code generation at boot), and its errors are the
 * AegisErrors both ends have always sent (`exitCode must be between 0 and 255`).
 *
 * What it returns is a copy holding only the fields the schema names, with defaults filled
 * in; an unknown field, a wrong type or a value out of bounds is INVALID_ARGUMENT naming the
 * field by its path. A keyword outside the subset is refused when the parser is made, so the
 * schema cannot say more than is checked.
 */
import { AegisError } from './errors.js';

export interface Schema {
  $ref?: string;
  type?: SchemaType | readonly SchemaType[];
  enum?: readonly unknown[];
  const?: unknown;
  properties?: Readonly<Record<string, Schema>>;
  required?: readonly string[];
  additionalProperties?: false | Schema;
  unevaluatedProperties?: false;
  allOf?: readonly Schema[];
  items?: Schema;
  minItems?: number;
  maxItems?: number;
  maxLength?: number;
  pattern?: string;
  contentEncoding?: 'base64';
  minimum?: number;
  maximum?: number;
  default?: unknown;
  description?: string;
  /** The error for a failed pattern, range or array size; `{path}` is replaced by the field's path. */
  'x-message'?: string;
}
export type SchemaType = 'object' | 'array' | 'string' | 'integer' | 'boolean' | 'null';

const KEYWORDS = new Set([
  '$ref',
  'type',
  'enum',
  'const',
  'properties',
  'required',
  'additionalProperties',
  'unevaluatedProperties',
  'allOf',
  'items',
  'minItems',
  'maxItems',
  'maxLength',
  'pattern',
  'contentEncoding',
  'minimum',
  'maximum',
  'default',
  'description',
  'x-message',
]);

/** Strings with no maxLength of their own are cut here, as they always were. */
const DEFAULT_MAX_LENGTH = 1 << 20;

type Obj = Record<string, unknown>;
/** `path`: the field's path from the root, '' at the root itself, which errors call `root`. */
export type Parser = (value: unknown, path: string, root: string) => unknown;

const fail = (message: string): never => {
  throw new AegisError('INVALID_ARGUMENT', message);
};

/** An object schema with its `allOf` parts folded in: the properties it names and whether others are refused. */
interface ObjectShape {
  properties: Record<string, Schema>;
  required: Set<string>;
  closed: boolean;
  values: Schema | undefined;
}

/**
 * Builds parsers for the schemas of one document; `$ref`s are `#/$defs/Name` into `defs`.
 * Each schema is compiled once, on first use.
 */
export class SchemaParsers {
  private readonly compiled = new WeakMap<Schema, Parser>();

  constructor(private readonly defs: Readonly<Record<string, Schema>>) {}

  /** A parser for `schema`; `what` names the value in errors (`run params`, `ready`). */
  parser<T>(schema: Schema, what: string): (value: unknown) => T {
    this.vet(schema, new Set());
    const parse = this.compile(schema);
    return (value) => parse(value, '', what) as T;
  }

  /** Refuses, now rather than at first use, a keyword outside the subset or a $ref to nothing. */
  private vet(schema: Schema, seen: Set<Schema>): void {
    if (seen.has(schema)) return;
    seen.add(schema);
    for (const k of Object.keys(schema)) if (!KEYWORDS.has(k)) throw new Error(`schema: keyword ${k} is not supported`);
    const parts = [
      ...(schema.$ref === undefined ? [] : [this.resolve(schema)]),
      ...Object.values(schema.properties ?? {}),
      ...(schema.allOf ?? []),
      ...(schema.items ? [schema.items] : []),
      ...(typeof schema.additionalProperties === 'object' ? [schema.additionalProperties] : []),
    ];
    for (const part of parts) this.vet(part, seen);
  }

  private resolve(schema: Schema): Schema {
    if (schema.$ref === undefined) return schema;
    const name = /^#\/\$defs\/([A-Za-z0-9_]+)$/.exec(schema.$ref)?.[1];
    const target = name === undefined ? undefined : this.defs[name];
    if (!target) throw new Error(`schema: unresolvable $ref ${schema.$ref}`);
    return this.resolve(target);
  }

  private compile(schema: Schema): Parser {
    const known = this.compiled.get(schema);
    if (known) return known;
    // Compiled lazily: a recursive schema would otherwise never finish.
    let parse: Parser | undefined;
    const lazy: Parser = (v, path, root) => (parse ??= this.build(schema))(v, path, root);
    this.compiled.set(schema, lazy);
    return lazy;
  }

  private build(schema: Schema): Parser {
    if (schema.$ref !== undefined) return this.compile(this.resolve(schema));
    const types = schema.type === undefined ? undefined : Array.isArray(schema.type) ? schema.type : [schema.type];
    const message = (name: string, fallback: string): string => schema['x-message']?.replaceAll('{path}', name) ?? fallback;
    if (schema.enum !== undefined || schema.const !== undefined) {
      const allowed = schema.enum ?? [schema.const];
      const said = allowed.map((a) => (typeof a === 'string' ? a : JSON.stringify(a))).join(' or ');
      return (v, path, root) => (allowed.includes(v) ? v : fail(`${path || root} must be ${said}`));
    }
    if (types === undefined && schema.allOf !== undefined) return this.object(schema, message);
    if (types === undefined) throw new Error('schema: a schema needs a type, an enum, a const, a $ref or an allOf');
    const nullable = types.includes('null');
    const [type, ...others] = types.filter((t) => t !== 'null');
    if (others.length > 0) throw new Error('schema: at most one type besides null');
    let parse: Parser;
    switch (type) {
      case 'object':
        parse = this.object(schema, message);
        break;
      case 'array':
        parse = this.array(schema, message);
        break;
      case 'string':
        parse = string(schema, message);
        break;
      case 'integer':
        parse = integer(schema, message);
        break;
      case 'boolean':
        parse = (v, path, root) => (typeof v === 'boolean' ? v : fail(`${path || root} must be true or false`));
        break;
      case undefined:
        parse = (v, path, root) => (v === null ? null : fail(`${path || root} must be null`));
        break;
      default:
        throw new Error(`schema: type ${String(type)} is not supported`);
    }
    return nullable ? (v, path, root) => (v === null ? null : parse(v, path, root)) : parse;
  }

  private shape(schema: Schema): ObjectShape {
    const s = this.resolve(schema);
    const shape: ObjectShape = { properties: {}, required: new Set(), closed: false, values: undefined };
    for (const part of s.allOf ?? []) {
      const inner = this.shape(part);
      Object.assign(shape.properties, inner.properties);
      for (const r of inner.required) shape.required.add(r);
      if (inner.closed) throw new Error('schema: an allOf part may not refuse other properties (use unevaluatedProperties)');
    }
    Object.assign(shape.properties, s.properties ?? {});
    for (const r of s.required ?? []) shape.required.add(r);
    if (typeof s.additionalProperties === 'object') shape.values = s.additionalProperties;
    shape.closed = s.additionalProperties === false || s.unevaluatedProperties === false;
    return shape;
  }

  private object(schema: Schema, message: (path: string, fallback: string) => string): Parser {
    const { properties, required, closed, values } = this.shape(schema);
    const fields = Object.entries(properties).map(([name, s]) => ({
      name,
      parse: this.compile(s),
      required: required.has(name),
      default: this.resolve(s).default ?? s.default,
    }));
    const parseValue = values && this.compile(values);
    return (v, path, root) => {
      const name = path || root;
      if (typeof v !== 'object' || v === null || Array.isArray(v)) return fail(message(name, `${name} must be an object`));
      const o = v as Obj;
      const out: Obj = {};
      if (parseValue) {
        // A map (env): its keys are data, each value checked.
        for (const [k, val] of Object.entries(o)) out[k] = parseValue(val, `${name}.${k}`, root);
        return out;
      }
      if (closed) {
        for (const k of Object.keys(o)) {
          // The name is the peer's: quoted and cut short, so an error message stays one short line.
          if (!Object.hasOwn(properties, k)) fail(`${name}: unknown field ${JSON.stringify(k.slice(0, 64))}`);
        }
      }
      // Top-level fields are named alone (`pid`), nested ones by their path (`bytes.stdout`).
      const prefix = path === '' ? '' : `${path}.`;
      for (const f of fields) {
        const value = Object.hasOwn(o, f.name) ? o[f.name] : undefined;
        if (value === undefined && !f.required) {
          if (f.default !== undefined) out[f.name] = structuredClone(f.default);
          continue;
        }
        // A required field that is absent fails its own type check: `signal must be ...`.
        out[f.name] = f.parse(value, `${prefix}${f.name}`, root);
      }
      return out;
    };
  }

  private array(schema: Schema, message: (path: string, fallback: string) => string): Parser {
    const min = schema.minItems ?? 0;
    const max = schema.maxItems ?? Infinity;
    const item = schema.items && this.compile(schema.items);
    return (v, path, root) => {
      const name = path || root;
      if (!Array.isArray(v) || v.length < min || v.length > max) return fail(message(name, `${name} must be an array`));
      return item ? v.map((e, i) => item(e, `${name}[${i}]`, root)) : [...(v as unknown[])];
    };
  }
}

function string(schema: Schema, message: (path: string, fallback: string) => string): Parser {
  const max = schema.maxLength ?? DEFAULT_MAX_LENGTH;
  const pattern = schema.pattern === undefined ? undefined : new RegExp(schema.pattern);
  const base64 = schema.contentEncoding === 'base64';
  return (v, path, root) => {
    const name = path || root;
    if (typeof v !== 'string') return fail(`${name} must be a string`);
    if (v.length > max) return fail(`${name} must be a string of at most ${max} characters`);
    if (pattern && !pattern.test(v)) return fail(message(name, `${name} must match ${schema.pattern ?? ''}`));
    // Canonical base64 (padded, as Buffer#toString('base64') writes it), checked by a round
    // trip: native, ~10x faster than any character test in JS or a regular expression (and a
    // pattern with a repeated group overflows V8's backtracking stack on megabytes).
    if (base64 && (v.length % 4 !== 0 || Buffer.from(v, 'base64').toString('base64') !== v)) return fail(`${name} must be base64`);
    return v;
  };
}

function integer(schema: Schema, message: (path: string, fallback: string) => string): Parser {
  const min = schema.minimum ?? Number.MIN_SAFE_INTEGER;
  const max = schema.maximum ?? Number.MAX_SAFE_INTEGER;
  return (v, path, root) => {
    const name = path || root;
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) return fail(`${name} must be an integer`);
    if (v < min || v > max) return fail(message(name, `${name} must be between ${min} and ${max}`));
    return v;
  };
}
