/**
 * An instance row as the registry stores it, for unit tests that put rows in a registry
 * directly (the registry's own tests, volumes, recovery). Defaults are a plain starting
 * instance; a test gives what it is about.
 */
import type { InstanceRow } from '../../packages/daemon/src/registry/db.js';

export function instanceRow(overrides: Partial<InstanceRow> = {}): InstanceRow {
  return {
    id: '0123456789abcdef',
    handle: 'web',
    state: 'starting',
    command: ['echo', 'hello world'],
    workdir: null,
    memoryMiB: 512,
    vcpuCount: 1,
    backend: 'some-backend',
    vmRecord: null,
    exitCode: null,
    stateReason: null,
    createdAt: 1_700_000_000_000,
    startedAt: null,
    stoppedAt: null,
    ports: [],
    network: 'none',
    image: null,
    spec: { env: {}, secrets: [] },
    volumes: [],
    ...overrides,
  };
}
