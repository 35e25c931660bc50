/**
 * The one backend registry: the backends built into Aegis, in order of preference, and those
 * registered besides them. The daemon picks from it (`AEGIS_BACKEND` names one, else the first
 * usable), `aegis doctor` probes every entry, and the shared backend suite runs each. Nothing
 * else lists backends.
 *
 * More are added without editing any of those: in-process with `registerBackend` (the shared
 * suite registers its test backend so), or by module with `AEGIS_BACKEND_MODULES`, a
 * comma-separated list of module paths or names, each exporting `backends: BackendEntry[]`.
 */
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { AegisError } from '@aegis/protocol';
import type { Backend, BackendEntry, BackendOptions, MissingBackend } from '@aegis/vmm';
import { QemuBackend } from '@aegis/vmm-qemu';
import { FirecrackerBackend } from '@aegis/vmm-firecracker';

export const BACKEND_MODULES_ENV = 'AEGIS_BACKEND_MODULES';

/** QEMU first: it runs everywhere (TCG without KVM); AEGIS_BACKEND=firecracker picks the other. */
const BUILT_IN: readonly BackendEntry[] = [
  { name: 'qemu', create: (options) => new QemuBackend(options) },
  { name: 'firecracker', create: (options) => new FirecrackerBackend(options) },
];

/** Backends named in the docs but not built into this version. */
export const MISSING_BACKENDS: readonly MissingBackend[] = [
  { name: 'libkrun', missing: 'not built into this version (needs libkrun: macOS Hypervisor.framework, or /dev/kvm)' },
];

const registered: BackendEntry[] = [];

/** Adds a backend after the built-in ones (one of the same name is replaced). */
export function registerBackend(entry: BackendEntry): void {
  const at = registered.findIndex((e) => e.name === entry.name);
  if (at >= 0) registered.splice(at, 1, entry);
  else registered.push(entry);
}

async function loadModule(spec: string): Promise<BackendEntry[]> {
  const url = spec.startsWith('.') || path.isAbsolute(spec) ? pathToFileURL(path.resolve(spec)).href : spec;
  let mod: { backends?: unknown };
  try {
    mod = (await import(url)) as { backends?: unknown };
  } catch (err) {
    throw new AegisError('INVALID_ARGUMENT', `${BACKEND_MODULES_ENV}: cannot load ${spec}: ${(err as Error).message}`);
  }
  const list = mod.backends;
  if (!Array.isArray(list) || !list.every((e: Partial<BackendEntry>) => typeof e?.name === 'string' && typeof e.create === 'function')) {
    throw new AegisError('INVALID_ARGUMENT', `${BACKEND_MODULES_ENV}: ${spec} exports no \`backends\` list of {name, create}`);
  }
  return list as BackendEntry[];
}

/** Every backend, in order of preference: built in, registered, then from `AEGIS_BACKEND_MODULES`. */
export async function backendEntries(env: NodeJS.ProcessEnv = process.env): Promise<BackendEntry[]> {
  const all = [...BUILT_IN, ...registered];
  for (const spec of (env[BACKEND_MODULES_ENV] ?? '').split(',').map((s) => s.trim())) {
    if (!spec) continue;
    for (const e of await loadModule(spec)) {
      const at = all.findIndex((x) => x.name === e.name);
      if (at >= 0) all.splice(at, 1, e);
      else all.push(e);
    }
  }
  return all;
}

/** One backend object per entry, made with the same options. */
export async function createBackends(options: BackendOptions, env: NodeJS.ProcessEnv = process.env): Promise<Backend[]> {
  return (await backendEntries(env)).map((e) => e.create(options));
}
