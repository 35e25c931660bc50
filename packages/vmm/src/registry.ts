/**
 * What a backend registry holds: a name and how to make the backend. The list itself (which
 * backends are built in, in which order, and how more are registered) is `@aegis/backends`,
 * because this package may not import backend packages.
 */
import type { Backend, BackendName } from './vmm.js';

/** What every backend is made with: where the guest kernel is, and where verdicts are kept. */
export interface BackendOptions {
  /** The guest kernel (uncompressed): what a KVM test boot runs. */
  kernelPath?: string;
  /** Where KVM verdicts are kept (`accel-verdicts.json`, beside the guest artifacts). */
  cacheDir?: string;
}

export interface BackendEntry {
  readonly name: BackendName;
  create(options: BackendOptions): Backend;
}

/** A backend that is not built into this version, with why (listed by `doctor` and the shared suite). */
export interface MissingBackend {
  readonly name: BackendName;
  readonly missing: string;
}
