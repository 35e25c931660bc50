/**
 * User-mode guest networking shared by every backend: passt (Debian package `passt`), one
 * process per VM, serving one client on a unix socket (QEMU's `-netdev stream`; libkrun's
 * `krun_set_passt_fd` would take the same). Chosen over QEMU's built-in slirp (and libkrun's
 * TSI) because those map their gateway address to the host's loopback, and passt can be told
 * not to (`--no-map-gw`): the guest reaches the network but never aegisd's or anyone's
 * 127.0.0.1 services. It runs `--one-off`, so it exits with its VMM and needs no record of its
 * own; like the VMM it is detached and survives an aegisd restart.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { promisify } from 'node:util';
import { AegisError } from '@aegis/protocol';
import { DetachedProcess } from './process.js';

const execFileP = promisify(execFile);

export const PASST_BINARY = 'passt';
export const PASST_INSTALL_HINT = 'Debian: apt-get install passt';

/** What passt is told to hand out, and what the guest is told to use (`aegis_net=`). */
export const GUEST_NET = { address: '10.0.2.15', prefix: 24, gateway: '10.0.2.2', dns: '10.0.2.3' } as const;

/** The kernel command-line word aegis-init configures eth0 from. */
export function guestNetKernelArg(): string {
  return `aegis_net=${GUEST_NET.address}/${GUEST_NET.prefix},${GUEST_NET.gateway},${GUEST_NET.dns}`;
}

const NOBODY = 65534;
/**
 * As root, passt runs as "nobody" (one less thing a guest that breaks passt gets), and nobody
 * cannot reach into a 0700 AEGIS_HOME: its socket then lives under /run instead.
 */
const ROOT_PASST_DIR = '/run/aegis/passt';

export async function passtAvailable(): Promise<boolean> {
  try {
    await execFileP(PASST_BINARY, ['--version'], { timeout: 10_000 });
    return true;
  } catch {
    return false;
  }
}

/** Where a VM's passt keeps its socket: its own directory (removed with `Passt.cleanup`). */
export function passtPaths(stateDir: string, id: string): { dir: string; socket: string; log: string } {
  const dir = process.getuid?.() === 0 ? path.join(ROOT_PASST_DIR, id) : path.join(stateDir, 'net');
  return { dir, socket: path.join(dir, 'passt.sock'), log: path.join(stateDir, 'passt.log') };
}

/**
 * For `npm run bench` only: AEGIS_BENCH_PASST_TCP=HOST:GUEST adds passt's own port forward,
 * the backend's raw mechanism that --expose is measured against on the same VM.
 */
function benchPasstForward(): string | undefined {
  const spec = process.env['AEGIS_BENCH_PASST_TCP'];
  return spec && /^\d+:\d+$/.test(spec) ? spec : undefined;
}

/** One VM's passt, started and listening on `socket`. */
export class Passt {
  private constructor(
    readonly socket: string,
    private readonly dir: string,
    readonly proc: DetachedProcess,
  ) {}

  /**
   * Starts passt for VM `id` and resolves once its socket exists (a VMM connects once, at its
   * start, so it must be there first). UNAVAILABLE with passt's last words when it does not.
   */
  static async start(stateDir: string, id: string, signal?: AbortSignal): Promise<Passt> {
    const p = passtPaths(stateDir, id);
    const asRoot = process.getuid?.() === 0;
    await fs.rm(p.dir, { recursive: true, force: true });
    if (asRoot) {
      await fs.mkdir(ROOT_PASST_DIR, { recursive: true, mode: 0o711 });
      await fs.chmod(ROOT_PASST_DIR, 0o711);
    }
    await fs.mkdir(p.dir, { mode: 0o700 });
    if (asRoot) await fs.chown(p.dir, NOBODY, NOBODY);
    const args = [
      '--foreground',
      '--one-off',
      '--socket',
      p.socket,
      '--no-map-gw',
      '--address',
      GUEST_NET.address,
      '--netmask',
      String(GUEST_NET.prefix),
      '--gateway',
      GUEST_NET.gateway,
      '--dns-forward',
      GUEST_NET.dns,
      // No inbound forwarding through passt: --expose goes over the data channel.
      '--tcp-ports',
      benchPasstForward() ?? 'none',
      '--udp-ports',
      'none',
      // Logged through the stderr we give it: passt cannot open a log file once it is "nobody".
      '--stderr',
      '--quiet',
      // passt would pick "nobody" on its own as root; saying so keeps it explicit.
      ...(asRoot ? ['--runas', `${NOBODY}:${NOBODY}`] : []),
    ];
    const proc = await DetachedProcess.spawn(PASST_BINARY, args, { logFile: p.log, what: 'passt' }).catch(async (err: unknown) => {
      await fs.rm(p.dir, { recursive: true, force: true });
      throw err;
    });
    const passt = new Passt(p.socket, p.dir, proc);
    const deadline = Date.now() + 10_000;
    for (;;) {
      const ready = await fs.stat(p.socket).then(
        (st) => st.isSocket(),
        () => false,
      );
      if (ready) return passt;
      if (proc.hasExited || Date.now() > deadline || signal?.aborted) {
        await passt.kill();
        const tail = await fs.readFile(p.log, 'utf8').catch(() => '');
        throw new AegisError('UNAVAILABLE', `passt did not start: ${tail.trim().split('\n').slice(-2).join(' | ') || 'no socket'}`);
      }
      await new Promise((r) => setTimeout(r, 5));
    }
  }

  /** Ends passt at once (its VMM did not start) and removes its directory. */
  async kill(): Promise<void> {
    this.proc.kill('SIGKILL');
    await Passt.cleanup(this.dir);
  }

  /** Removes a VM's passt directory (it may be outside the state directory). */
  static async cleanup(dir: string): Promise<void> {
    await fs.rm(dir, { recursive: true, force: true }).catch(() => undefined);
  }
}

/** A passt of ours, by its command line (for stray discovery). */
export function isPasst(argv: string[]): boolean {
  return path.basename(argv[0] ?? '') === PASST_BINARY;
}
