/**
 * Request validation against the daemon's OpenAPI document (spec/openapi.json): each body is
 * checked once, here at the edge, with unknown fields rejected. Handlers then trust types.
 */
import { readFileSync } from 'node:fs';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { AegisError } from '@aegis/protocol';

const SPEC_URL = new URL('../../../../spec/openapi.json', import.meta.url);

interface OpenApiDoc {
  components: { schemas: Record<string, unknown> };
}

const doc = JSON.parse(readFileSync(SPEC_URL, 'utf8')) as OpenApiDoc;
// OpenAPI refs point at #/components/schemas; as one JSON Schema they live under $defs.
const defs = JSON.parse(JSON.stringify(doc.components.schemas).replaceAll('#/components/schemas/', '#/$defs/')) as Record<string, unknown>;
const ajv = new Ajv2020({ allErrors: false, strict: true, strictTypes: false, validateFormats: false });
ajv.addSchema({ $id: 'aegis-api', $defs: defs });

const cache = new Map<string, ValidateFunction>();

export function validateBody<T>(schemaName: string, body: unknown): T {
  let fn = cache.get(schemaName);
  if (!fn) {
    fn = ajv.getSchema(`aegis-api#/$defs/${schemaName}`);
    if (!fn) throw new AegisError('INTERNAL', `no schema ${schemaName} in the OpenAPI document`);
    cache.set(schemaName, fn);
  }
  if (!fn(body)) {
    const e = fn.errors?.[0];
    const where = e?.instancePath ? `${e.instancePath.slice(1).replaceAll('/', '.')}` : 'body';
    const params = (e?.params ?? {}) as { additionalProperty?: unknown };
    // Errors inside `propertyNames` carry the offending key here.
    const badName = (e as { propertyName?: string } | undefined)?.propertyName;
    const detail =
      e?.keyword === 'additionalProperties'
        ? `unknown field "${String(params.additionalProperty)}"`
        : badName !== undefined
          ? `has an invalid name "${badName}"`
          : (e?.message ?? 'is invalid');
    throw new AegisError('INVALID_ARGUMENT', `invalid request: ${where} ${detail}`);
  }
  return body as T;
}

export function specPaths(): string[] {
  return Object.keys((JSON.parse(readFileSync(SPEC_URL, 'utf8')) as { paths: Record<string, unknown> }).paths);
}
