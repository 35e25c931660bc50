import { AegisError } from '@aegis/protocol';
import type { Backend, Probe } from './vmm.js';

export interface BackendChoice {
  backend: Backend;
  probe: Probe;
  /** Every backend tried, in order, with what its probe said. */
  tried: { name: string; probe: Probe }[];
}

/**
 * Picks the first usable backend in preference order (like Cloud Hypervisor's hypervisor
 * probe): `preferred` first when given, then the rest. Fails with one message naming what
 * each backend lacked.
 */
export async function selectBackend(backends: Backend[], preferred?: string): Promise<BackendChoice> {
  const ordered = preferred ? [...backends.filter((b) => b.name === preferred), ...backends.filter((b) => b.name !== preferred)] : backends;
  if (preferred && !backends.some((b) => b.name === preferred)) {
    throw new AegisError('INVALID_ARGUMENT', `unknown backend "${preferred}" (known: ${backends.map((b) => b.name).join(', ')})`);
  }
  const tried: BackendChoice['tried'] = [];
  for (const backend of ordered) {
    let probe = await backend.probe();
    // Unusable only until a test settles (Firecracker testing KVM): worth the wait.
    if (!probe.available && probe.settled) probe = await probe.settled;
    tried.push({ name: backend.name, probe });
    if (probe.available) return { backend, probe, tried };
    if (preferred === backend.name) break;
  }
  throw new AegisError('UNAVAILABLE', `no usable VMM backend: ${tried.map((t) => `${t.name}: ${t.probe.detail}`).join('; ')}`);
}
