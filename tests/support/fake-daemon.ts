/**
 * The instance owner of aegisd over a fake backend (no VM), in a home of its own: what unit
 * tests of the manager's operations start from.
 */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { loadConfig } from '../../packages/daemon/src/config.js';
import { ImageService } from '../../packages/daemon/src/images/service.js';
import { InstanceManager } from '../../packages/daemon/src/instances/manager.js';
import { TemplateCache } from '../../packages/daemon/src/instances/templates.js';
import { Registry } from '../../packages/daemon/src/registry/db.js';
import { SecretStore } from '../../packages/daemon/src/secrets/store.js';
import type { VolumeKind } from '@aegis/vmm';
import { FakeBackend } from './fake-vmm.js';

export interface FakeDaemon {
  home: string;
  registry: Registry;
  backend: FakeBackend;
  m: InstanceManager;
  /** Every line the manager logged. */
  logged: string[];
  /** A new daemon over the same registry and backend: the old one lets go of its VMs, the new one recovers them. */
  restart(whileDown?: () => void | Promise<void>): Promise<InstanceManager>;
  /** Closes the registry and removes the home. */
  close(): void;
}

export async function fakeDaemon(
  prefix: string,
  /** `warm`: templates (snapshots, disk clones) in use; `poolSize`: a warm pool of that many VMs. */
  options: { volumeKinds?: VolumeKind[]; warm?: boolean; poolSize?: number } = {},
): Promise<FakeDaemon> {
  const home = mkdtempSync(path.join(os.tmpdir(), prefix));
  const kernelPath = path.join(home, 'vmlinux');
  const rootfsPath = path.join(home, 'base.erofs');
  writeFileSync(kernelPath, '');
  writeFileSync(rootfsPath, '');
  const warm = options.warm === true;
  const config = {
    ...loadConfig({ AEGIS_HOME: home }),
    kernelPath,
    rootfsPath,
    scratchDiskMiB: 8,
    warmBoot: warm,
    poolSize: options.poolSize ?? 0,
    bootTimeoutMs: 5000,
  };
  const registry = new Registry(config.dbPath);
  const backend = new FakeBackend(warm);
  const logged: string[] = [];
  const log = { info: (s: string) => void logged.push(s), warn: (s: string) => void logged.push(s) };
  const probe = await backend.probe();
  const templates = new TemplateCache(backend, () => probe, path.join(home, 'templates'), log, 5000, warm);
  const images = new ImageService(home, registry, log, { insecureRegistries: [] });
  const secrets = new SecretStore(registry, path.join(home, 'secrets.key'));
  const manager = (): InstanceManager =>
    new InstanceManager(config, registry, backend, log, secrets, templates, ['none'], images, undefined, options.volumeKinds);
  const fake: FakeDaemon = {
    home,
    registry,
    backend,
    m: manager(),
    logged,
    async restart(whileDown) {
      fake.m.detachAll();
      await whileDown?.();
      fake.m = manager();
      await fake.m.recover();
      return fake.m;
    },
    close() {
      void templates.close();
      registry.close();
      rmSync(home, { recursive: true, force: true });
    },
  };
  return fake;
}
