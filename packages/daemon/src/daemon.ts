/**
 * aegisd: wires the registry, the VMM backend, the instance manager and the HTTP API
 * together, and owns the socket and the process's lifetime.
 */
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type http from 'node:http';
import { AegisError } from '@aegis/protocol';
import { selectBackend, type Backend, type Probe } from '@aegis/vmm';
import { createBackends } from '@aegis/backends';
import { makePrivateDirs, type DaemonConfig } from './config.js';
import { InstanceManager } from './instances/manager.js';
import { endStrays } from './instances/recovery.js';
import { Registry } from './registry/db.js';
import { createServer } from './api/server.js';
import { instanceRoutes } from './api/routes/instances.js';
import { fileRoutes } from './api/routes/files.js';
import { secretRoutes } from './api/routes/secrets.js';
import { imageRoutes } from './api/routes/images.js';
import { snapshotRoutes } from './api/routes/snapshots.js';
import { volumeRoutes } from './api/routes/volumes.js';
import { VolumeService } from './volumes/service.js';
import { ImageService } from './images/service.js';
import { SecretStore } from './secrets/store.js';
import { TemplateCache } from './instances/templates.js';
import { systemRoutes } from './api/routes/system.js';
import { eventRoutes } from './api/routes/events.js';
import { metricsRoutes } from './api/routes/metrics.js';
import type { Logger } from './log.js';
import { LoopDelayMonitor } from './lag.js';
import { startE2bEndpoint, type E2bEndpoint } from './e2b/server.js';
import { ADDR_FILE as UI_ADDR_FILE, startUiServer, type UiServer } from './ui/server.js';

export const VERSION = '0.1.0';

/**
 * Every backend of the registry (@aegis/backends), in order of preference. They test KVM by
 * booting the guest kernel, and keep the verdict beside the guest artifacts (shared like the
 * templates).
 */
export async function knownBackends(config: DaemonConfig): Promise<Backend[]> {
  const kernelPath = await fs.realpath(config.kernelPath).catch(() => undefined);
  return createBackends({ cacheDir: await artifactCacheDir(config), ...(kernelPath ? { kernelPath } : {}) });
}

/** The directory holding the guest artifacts (`cache/`), or AEGIS_HOME/cache without them. */
async function artifactCacheDir(config: DaemonConfig): Promise<string> {
  const rootfs = await fs.realpath(config.rootfsPath).catch(() => undefined);
  return rootfs ? path.dirname(path.dirname(rootfs)) : path.join(config.home, 'cache');
}

export interface DaemonContext {
  version: string;
  config: DaemonConfig;
  backend: Backend;
  /** The backend's latest probe (its accelerator may change once KVM has been tested). */
  readonly probe: Probe;
  instances: InstanceManager;
  secrets: SecretStore;
  images: ImageService;
  /** How late the event loop runs (status reports it). */
  loopDelay: LoopDelayMonitor;
  shutdown(): Promise<void>;
}

/** Beside the guest artifacts, so every AEGIS_HOME using them shares the templates. */
async function templatesDir(config: DaemonConfig): Promise<string> {
  return config.templatesDir ?? path.join(await artifactCacheDir(config), 'templates');
}

/** Is another daemon answering on this socket? */
function socketAlive(file: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(file);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

export async function startDaemon(config: DaemonConfig, log: Logger): Promise<{ ctx: DaemonContext; closed: Promise<void> }> {
  // 0700 even when they already exist: an older aegisd (or a user's mkdir) may have left 0755.
  await makePrivateDirs(config);
  if (await socketAlive(config.socketPath)) {
    throw new AegisError('ALREADY_EXISTS', `aegisd is already running on ${config.socketPath}`);
  }
  await fs.rm(config.socketPath, { force: true });

  const backends = await knownBackends(config);
  const { backend, probe } = await selectBackend(backends, config.backend);
  log.info(`backend ${backend.name}: ${probe.detail}`);
  // The accelerator may still be under test: VMs boot under TCG until the verdict is in.
  let currentProbe = probe;
  void probe.settled?.then((final) => {
    currentProbe = final;
    log.info(`backend ${backend.name}: ${final.detail}`);
  });
  const registry = new Registry(config.dbPath);
  const secrets = new SecretStore(registry, path.join(config.home, 'secrets.key'));
  // Warm boot needs snapshots and copy-on-write children of the template's disk.
  const warm = config.warmBoot && probe.capabilities?.snapshot === true && probe.capabilities.diskClones;
  const templates = new TemplateCache(backend, () => currentProbe, await templatesDir(config), log, config.bootTimeoutMs, warm);
  const images = new ImageService(config.home, registry, log, { insecureRegistries: config.insecureRegistries });
  const instances = new InstanceManager(
    config,
    registry,
    backend,
    log,
    secrets,
    templates,
    probe.capabilities?.networkModes ?? ['none'],
    images,
    new VolumeService(path.join(config.home, 'volumes'), registry, log),
    probe.capabilities?.volumeKinds ?? [],
  );
  await instances.recover();
  await instances.snapshots.sweep();
  // VMs an earlier daemon started with another backend (AEGIS_BACKEND changed): no instance
  // can own them now (their rows were settled above), and only their backend can find them.
  for (const other of backends.filter((b) => b !== backend)) {
    await endStrays({ registry, backend: other, instancesDir: config.instancesDir, log });
  }
  await instances.volumes.cleanup();
  // What a killed daemon left: half-built templates (and their VMMs), unreferenced old builds.
  await templates.collect();
  void instances.warmUp();

  const loopDelay = new LoopDelayMonitor();
  instances.metrics.attach({
    rows: () => registry.listInstances(),
    figures: (id) => instances.figures(id),
    pool: () => {
      const p = instances.poolStatus();
      return p ? { ready: p.ready, target: p.size } : undefined;
    },
    loopDelay,
  });

  let resolveClosed!: () => void;
  const closed = new Promise<void>((r) => (resolveClosed = r));
  let stopping = false;
  let e2b: E2bEndpoint | undefined;
  let ui: UiServer | undefined;
  const ctx: DaemonContext = {
    version: VERSION,
    config,
    backend,
    get probe() {
      return currentProbe;
    },
    instances,
    secrets,
    images,
    loopDelay,
    async shutdown() {
      if (stopping) return closed;
      stopping = true;
      log.info('shutting down (running VMs keep running)');
      ctx.loopDelay.stop();
      await e2b?.close();
      await ui?.close();
      instances.detachAll();
      // A template build's VMM is ours alone: it must not outlive the daemon. Nor a pooled VM.
      await Promise.all([templates.close(), instances.closePool()]);
      server.close();
      server.closeAllConnections();
      await fs.rm(config.socketPath, { force: true });
      registry.close();
      resolveClosed();
    },
  };
  const server: http.Server = createServer(
    [
      ...systemRoutes(ctx),
      ...eventRoutes(instances, instances.events),
      ...metricsRoutes(instances.metrics),
      ...instanceRoutes(ctx),
      ...fileRoutes(ctx),
      ...secretRoutes(ctx),
      ...imageRoutes(ctx),
      ...volumeRoutes(ctx),
      ...snapshotRoutes(ctx),
    ],
    log,
  );
  // The socket is the daemon's whole authority: only its owner may connect.
  const oldUmask = process.umask(0o177);
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(config.socketPath, () => resolve());
    });
  } finally {
    process.umask(oldUmask);
  }
  await fs.chmod(config.socketPath, 0o600);
  log.info(`aegisd ${VERSION} listening on ${config.socketPath}`);
  // E2B's API on loopback TCP (issue 23): a translation layer over the same manager.
  if (config.e2bAddr) {
    try {
      e2b = await startE2bEndpoint(ctx, config.e2bAddr, log);
    } catch (err) {
      await ctx.shutdown();
      throw err;
    }
  }
  // The dashboard (issue 24): a browser's view over this same API, on loopback TCP.
  if (config.uiAddr) {
    try {
      ui = await startUiServer(ctx, config.uiAddr, log);
    } catch (err) {
      await ctx.shutdown();
      throw err;
    }
  } else {
    // A killed aegisd that served it left its address: `aegis ui` must not send anyone there.
    await fs.rm(path.join(config.home, UI_ADDR_FILE), { force: true });
  }
  return { ctx, closed };
}
