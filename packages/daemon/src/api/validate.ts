/**
 * Request validation against the daemon's OpenAPI document (spec/openapi.json): each body is
 * checked once, here at the edge, with unknown fields rejected. Handlers then trust types.
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { AegisError } from '@aegis/protocol';
import type { ApiSchemaName, ApiSchemas } from '@aegis/protocol/api';
import { checkMounts } from '../volumes/mounts.js';

const SPEC_URL = new URL('../../../../spec/openapi.json', import.meta.url);

interface OpenApiDoc {
  components: { schemas: Record<string, unknown> };
}

const doc = JSON.parse(readFileSync(SPEC_URL, 'utf8')) as OpenApiDoc;
// OpenAPI refs point at #/components/schemas; as one JSON Schema they live under $defs.
const defs = JSON.parse(JSON.stringify(doc.components.schemas).replaceAll('#/components/schemas/', '#/$defs/')) as Record<string, unknown>;
// verbose: errors carry the offending value, to tell a NUL byte from other pattern misses.
const ajv = new Ajv2020({ allErrors: false, strict: true, strictTypes: false, validateFormats: false, verbose: true });
ajv.addSchema({ $id: 'aegis-api', $defs: defs });

const cache = new Map<string, ValidateFunction>();

/** A name or value echoed in an error message, cut short: the body it came from may be megabytes. */
function quote(v: string): string {
  return JSON.stringify(v.length > 64 ? `${v.slice(0, 64)}…` : v);
}

/**
 * Rules the schemas cannot state (ajv checks no `format` here), applied once the schema has
 * passed: still validation, still before anything is bound, resolved or booted.
 */
const EXTRA_CHECKS: { [N in ApiSchemaName]?: (body: ApiSchemas[N]) => void } = {
  CreateInstanceRequest: (body) => {
    // Said here, not as an anyOf in the schema: the API's generated types stay one plain object.
    if (body.command === undefined && body.image === undefined && body.snapshot === undefined) {
      throw new AegisError('INVALID_ARGUMENT', "invalid request: body must have 'command' or 'image' (or both), or 'snapshot'");
    }
    for (const [i, e] of (body.exposes ?? []).entries()) {
      // A host name here would be resolved by listen(): a DNS query leaving the machine.
      if (e.hostIp !== undefined && isIP(e.hostIp) === 0) {
        throw new AegisError(
          'INVALID_ARGUMENT',
          `invalid request: exposes.${i}.hostIp must be an IPv4 or IPv6 address, not ${quote(e.hostIp)}`,
        );
      }
    }
    checkMounts((body.volumes ?? []).map((v) => ({ ...v, readOnly: v.readOnly === true })));
  },
};

/**
 * Checks `body` against the OpenAPI schema named `schemaName` and returns it as that schema's
 * generated type: the name picks both the check and the type, so they cannot disagree.
 */
export function validateBody<N extends ApiSchemaName>(schemaName: N, body: unknown): ApiSchemas[N] {
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
        ? `unknown field ${quote(String(params.additionalProperty))}`
        : badName !== undefined
          ? `has an invalid name ${quote(badName)}`
          : e?.keyword === 'pattern' && typeof e.data === 'string' && e.data.includes('\0')
            ? 'must not contain a NUL byte'
            : (e?.message ?? 'is invalid');
    throw new AegisError('INVALID_ARGUMENT', `invalid request: ${where} ${detail}`);
  }
  const valid = body as ApiSchemas[N];
  (EXTRA_CHECKS[schemaName] as ((b: ApiSchemas[N]) => void) | undefined)?.(valid);
  return valid;
}

export function specPaths(): string[] {
  return Object.keys((JSON.parse(readFileSync(SPEC_URL, 'utf8')) as { paths: Record<string, unknown> }).paths);
}
