/**
 * Hardware acceleration is tested, not assumed. A `/dev/kvm` that opens and even answers
 * `KVM_CREATE_VM` may still be unable to run our guest (a paravirtual `kvm-pvm` host, nested
 * virtualisation without VT-x passed through, a module that loads but does not work). So a
 * backend boots the guest kernel once under KVM with a short deadline, and the verdict is kept
 * here, keyed by everything that could change it: the host kernel, the VMM's version, the guest
 * kernel and the device node. A new key means a new test; until a verdict exists the backend
 * uses software emulation, so nothing fails on first contact.
 */
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';

export const KVM_DEVICE = '/dev/kvm';

/** `AEGIS_ACCEL`: `auto` tests KVM; `kvm` uses it without a test; `tcg` never uses it. */
export type AccelMode = 'auto' | 'kvm' | 'tcg';

/** How long a KVM test boot may take to reach init, unless AEGIS_KVM_TEST_TIMEOUT_MS says. */
export const DEFAULT_KVM_TEST_TIMEOUT_MS = 5000;

/**
 * The KVM test boot's deadline: AEGIS_KVM_TEST_TIMEOUT_MS (500 ms to 10 min), else 5 s. A
 * working KVM reaches init in well under a second; a nested one (KVM under TCG, or a loaded
 * cloud VM) can take several, and a verdict of "cannot run the guest" would put it on TCG.
 */
export function kvmTestTimeoutMs(env: NodeJS.ProcessEnv = process.env): number {
  const v = env['AEGIS_KVM_TEST_TIMEOUT_MS'];
  if (v === undefined || v === '') return DEFAULT_KVM_TEST_TIMEOUT_MS;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 500 || n > 600_000) {
    throw new AegisError('INVALID_ARGUMENT', `AEGIS_KVM_TEST_TIMEOUT_MS=${v}: give a whole number of milliseconds from 500 to 600000`);
  }
  return n;
}

export function accelMode(env: NodeJS.ProcessEnv = process.env): AccelMode {
  const v = env['AEGIS_ACCEL'];
  return v === 'kvm' || v === 'tcg' ? v : 'auto';
}

export interface AccelVerdict {
  /** The guest kernel reached init under KVM within the deadline. */
  usable: boolean;
  /** One line: what happened (the VMM's own words when it failed). */
  detail: string;
  /** How long the test boot took. */
  costMs: number;
  testedAt: string;
}

/** Why `/dev/kvm` cannot even be opened, or undefined when it can. */
export async function kvmDeviceProblem(device = KVM_DEVICE): Promise<string | undefined> {
  try {
    const fh = await fs.open(device, 'r+');
    await fh.close();
    return undefined;
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') return `${device} is missing`;
    if (code === 'EACCES' || code === 'EPERM') return `${device} is not accessible to this user (add it to the kvm group)`;
    return `${device} cannot be opened (${code ?? (err as Error).message})`;
  }
}

/**
 * The cache key: host kernel release and build, the VMM's version line, the guest kernel
 * (path, size, mtime) and the device node's identity. Any of them changing re-runs the test.
 */
export async function verdictKey(vmmVersion: string, guestKernel: string, device = KVM_DEVICE, deadlineMs?: number): Promise<string> {
  const kst = await fs.stat(guestKernel).catch(() => undefined);
  const dst = await fs.stat(device).catch(() => undefined);
  const parts = {
    host: `${os.release()} ${os.version()}`,
    vmm: vmmVersion,
    guest: `${guestKernel}:${kst?.size ?? 0}:${kst?.mtimeMs ?? 0}`,
    device: `${device}:${dst?.rdev ?? 0}:${dst?.ino ?? 0}`,
    // Another deadline is another test: a verdict under a short one is not kept for a longer.
    ...(deadlineMs !== undefined ? { deadlineMs } : {}),
  };
  return createHash('sha256').update(JSON.stringify(parts)).digest('hex').slice(0, 24);
}

/** Verdicts on disk (one small JSON file), shared by every daemon using the same cache. */
export class VerdictCache {
  constructor(private readonly file: string) {}

  async get(backend: string, key: string): Promise<AccelVerdict | undefined> {
    const all = await this.readAll();
    const v = all[`${backend}:${key}`];
    return isVerdict(v) ? v : undefined;
  }

  async put(backend: string, key: string, verdict: AccelVerdict): Promise<void> {
    const all = await this.readAll();
    all[`${backend}:${key}`] = verdict;
    await fs.mkdir(path.dirname(this.file), { recursive: true, mode: 0o700 });
    // Written aside and renamed: a reader never sees half a file.
    const tmp = `${this.file}.${process.pid}.tmp`;
    await fs.writeFile(tmp, `${JSON.stringify(all, null, 2)}\n`, { mode: 0o600 });
    await fs.rename(tmp, this.file);
  }

  private async readAll(): Promise<Record<string, unknown>> {
    try {
      const v: unknown = JSON.parse(await fs.readFile(this.file, 'utf8'));
      return typeof v === 'object' && v !== null && !Array.isArray(v) ? (v as Record<string, unknown>) : {};
    } catch {
      return {};
    }
  }
}

function isVerdict(v: unknown): v is AccelVerdict {
  if (typeof v !== 'object' || v === null) return false;
  const r = v as Record<string, unknown>;
  return typeof r['usable'] === 'boolean' && typeof r['detail'] === 'string' && typeof r['costMs'] === 'number';
}

/**
 * One test per key at a time in this process: a daemon that asks again while a test runs gets
 * the same promise.
 */
export class VerdictGate {
  private readonly running = new Map<string, Promise<AccelVerdict>>();

  constructor(private readonly cache: VerdictCache) {}

  cached(backend: string, key: string): Promise<AccelVerdict | undefined> {
    return this.cache.get(backend, key);
  }

  /** The cached verdict, or the result of `test` (stored for next time). */
  decide(backend: string, key: string, test: () => Promise<AccelVerdict>): Promise<AccelVerdict> {
    const id = `${backend}:${key}`;
    const inFlight = this.running.get(id);
    if (inFlight) return inFlight;
    const p = (async () => {
      const known = await this.cache.get(backend, key);
      if (known) return known;
      const v = await test();
      await this.cache.put(backend, key, v).catch(() => undefined);
      return v;
    })().finally(() => this.running.delete(id));
    this.running.set(id, p);
    return p;
  }
}

/** The verdict file in a backend's cache directory, shared by every backend. */
export const VERDICT_FILE = 'accel-verdicts.json';

const gates = new Map<string, VerdictGate>();

/**
 * The one gate for the verdict file in `cacheDir`, per process: two backends (or two probes)
 * asking while a test boot runs share it instead of booting twice.
 */
export function verdictGate(cacheDir: string): VerdictGate {
  const file = path.join(cacheDir, VERDICT_FILE);
  let gate = gates.get(file);
  if (!gate) {
    gate = new VerdictGate(new VerdictCache(file));
    gates.set(file, gate);
  }
  return gate;
}
