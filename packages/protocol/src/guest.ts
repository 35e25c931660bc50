/**
 * The guest <-> host contract: every method and notification on the agent channel, with
 * the parsers that check what arrives. The contract itself is spec/guest-rpc.schema.json;
 * its types are generated from it and these parsers are driven by it.
 *
 * Transport: newline-delimited JSON-RPC 2.0 over the VM's agent channel (virtio-serial on
 * QEMU, vsock on Firecracker and libkrun). The host is the client; the guest (the harness)
 * answers requests and sends notifications. Binary data travels base64-encoded.
 */
import { constants as osConstants } from 'node:os';
import { AegisError } from './errors.js';
import { guestRpcSchema, type ExitEvent, type GuestEvents, type GuestMethods } from './generated/guest-rpc.js';
import { SchemaParsers, type Schema } from './schema.js';

// The types come from spec/guest-rpc.schema.json through generated/guest-rpc.ts.
export type * from './generated/guest-rpc.js';

export const GUEST_PROTOCOL_VERSION = guestRpcSchema.version;
export const MAX_PS_PROCESSES = guestRpcSchema.methods.ps.result.properties.processes.maxItems;
export const MAX_PS_COMMAND = guestRpcSchema.$defs.ProcessInfo.properties.command.maxLength;

export type GuestMethod = keyof GuestMethods;
export type GuestEvent = keyof GuestEvents;

// ---- parsers ----------------------------------------------------------------------------
// Everything from the guest is untrusted: the host parses each notification and result with
// these before use. The harness uses the same parsers on what the host asks. Each is the
// schema's own (schema.ts): the fields it names, of its types, within its bounds, no others.

const schemas = new SchemaParsers(guestRpcSchema.$defs as Record<string, Schema>);
const methods = guestRpcSchema.methods as Record<GuestMethod, { params: Schema; result: Schema }>;
const events = guestRpcSchema.events as Record<GuestEvent, { params: Schema }>;

/** What no schema can say: one field bounded by another. */
const REFINE: { [M in GuestMethod]?: (result: GuestMethods[M]['result']) => void } = {
  stats: (r) => {
    if (r.memAvailableKiB > r.memTotalKiB) {
      throw new AegisError('INVALID_ARGUMENT', `memAvailableKiB must be between 0 and ${r.memTotalKiB}`);
    }
  },
};

function eachMethod<F>(make: (m: GuestMethod) => F): Record<GuestMethod, F> {
  return Object.fromEntries((Object.keys(methods) as GuestMethod[]).map((m) => [m, make(m)])) as Record<GuestMethod, F>;
}

export const parseParams = eachMethod((m) => {
  const parse = schemas.parser(methods[m].params, `${m} params`);
  // Params may be left out altogether (JSON-RPC allows it): that is `{}`.
  return (v: unknown) => parse(v ?? {});
}) as { [M in GuestMethod]: (v: unknown) => GuestMethods[M]['params'] };

export const parseResult = eachMethod((m) => {
  const parse = schemas.parser<never>(methods[m].result, `${m} result`);
  const refine = REFINE[m] as ((r: unknown) => void) | undefined;
  return (v: unknown) => {
    const r = parse(v);
    refine?.(r);
    return r;
  };
}) as { [M in GuestMethod]: (v: unknown) => GuestMethods[M]['result'] };

export const parseEvent = Object.fromEntries(
  (Object.keys(events) as GuestEvent[]).map((e) => [e, schemas.parser(events[e].params, e)]),
) as { [E in GuestEvent]: (v: unknown) => GuestEvents[E] };

export function isGuestMethod(m: string): m is GuestMethod {
  return Object.hasOwn(parseParams, m);
}
export function isGuestEvent(m: string): m is GuestEvent {
  return Object.hasOwn(parseEvent, m);
}

/** The shell's exit status for an exit: the code, or 128 + N when killed by signal N. */
export function exitStatus(ev: Pick<ExitEvent, 'exitCode' | 'signal'>): number {
  if (ev.exitCode !== null) return ev.exitCode;
  const n = ev.signal === null ? undefined : (osConstants.signals as Record<string, number | undefined>)[ev.signal];
  return n === undefined ? 255 : 128 + n;
}
