import { AegisError } from '@aegis/protocol';
import type { SnapshotView } from '@aegis/protocol/api';
import type { DaemonContext } from '../../daemon.js';
import type { Snapshot } from '../../snapshots/store.js';
import { validateBody } from '../validate.js';
import { reply, type Route } from '../server.js';

function param(params: Record<string, string>, key: string): string {
  const v = params[key];
  if (v === undefined) throw new AegisError('INVALID_ARGUMENT', `missing ${key}`);
  return v;
}

function view(s: Snapshot, dependents: string[]): SnapshotView {
  const { meta } = s;
  return {
    name: meta.name,
    createdAt: new Date(meta.createdAt).toISOString(),
    source: { id: meta.instance.id, handle: meta.instance.handle },
    command: meta.instance.command,
    ...(meta.instance.labels ? { labels: meta.instance.labels } : {}),
    ...(meta.instance.image ? { image: meta.instance.image.reference ?? meta.instance.image.digest } : {}),
    memoryMiB: meta.machine.memoryMiB,
    vcpuCount: meta.machine.vcpuCount,
    network: meta.instance.network,
    stateBytes: meta.stateBytes,
    diskBytes: meta.diskBytes,
    sizeBytes: meta.stateBytes + Object.values(meta.stateFiles ?? {}).reduce((a, b) => a + b, 0) + meta.diskAllocatedBytes,
    auto: meta.auto,
    dependents,
    backend: meta.machine.backend,
    acceleration: meta.machine.acceleration,
  };
}

/** Checkpoints (`aegis snapshot …`) and forks. */
export function snapshotRoutes(d: DaemonContext): Route[] {
  const m = d.instances;
  const defaultName = (handle: string): string =>
    `${handle.slice(0, 100)}-${new Date()
      .toISOString()
      .replace(/[-:]/g, '')
      .replace(/\.\d+Z$/, '')
      .replace('T', '-')}`;
  return [
    {
      method: 'POST',
      path: '/v1/instances/{ref}/snapshots',
      handler: async ({ params, body, signal }) => {
        const req = validateBody('CreateSnapshotRequest', body ?? {});
        const instance = m.instance(param(params, 'ref'));
        const snap = await instance.checkpoint(req.name ?? defaultName(instance.view().handle), false, signal);
        return reply('createSnapshot', 201, view(snap, m.snapshotDependents(snap.meta.name)));
      },
    },
    {
      method: 'POST',
      path: '/v1/instances/{ref}/fork',
      handler: async ({ params, body, signal }) => {
        const req = validateBody('ForkRequest', body ?? {});
        const { count = req.names?.length ?? 1, ...options } = req;
        return reply('forkInstance', 201, await m.fork(param(params, 'ref'), count, options, signal));
      },
    },
    {
      method: 'GET',
      path: '/v1/snapshots',
      handler: async () =>
        reply('listSnapshots', 200, {
          snapshots: (await m.snapshots.list()).map((s) => view(s, m.snapshotDependents(s.meta.name))),
        }),
    },
    {
      method: 'GET',
      path: '/v1/snapshots/{name}',
      handler: async ({ params }) => {
        const s = await m.snapshots.get(param(params, 'name'));
        return reply('getSnapshot', 200, view(s, m.snapshotDependents(s.meta.name)));
      },
    },
    {
      method: 'DELETE',
      path: '/v1/snapshots/{name}',
      handler: async ({ params }) => {
        await m.deleteSnapshot(param(params, 'name'));
        return { status: 204 };
      },
    },
  ];
}
