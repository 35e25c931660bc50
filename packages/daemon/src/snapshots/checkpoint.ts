/**
 * Taking a checkpoint of one running VM (`Instance.checkpoint` decides when; this does it): the
 * VMM stops it and writes its device and RAM state, the backend copies its disk, and it carries
 * on whatever happened. One consistent point: the VMM flushes and drains the disk when it stops.
 */
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { Backend, Vm } from '@aegis/vmm';
import type { Logger } from '../log.js';
import type { InstanceRow } from '../registry/db.js';
import type { MachineRecord } from '../instances/machine.js';
import type { Snapshot, SnapshotStore } from './store.js';

/** Why `row` cannot be checkpointed, or undefined. */
export function checkpointRefusal(row: InstanceRow): AegisError | undefined {
  const writable = row.volumes.filter((v) => v.type === 'volume' && !v.readOnly);
  if (writable.length > 0) {
    return new AegisError(
      'FAILED_PRECONDITION',
      `instance "${row.handle}" has the named volume ${writable.map((v) => v.source).join(', ')} writable: a volume has one writer, and an instance started from a snapshot would be a second; mount it :ro (or use a host directory) to snapshot it`,
    );
  }
  if (row.spec.stdin || row.spec.tty) {
    return new AegisError(
      'FAILED_PRECONDITION',
      `instance "${row.handle}" has its stdin or a terminal attached to a client; a snapshot of it would have neither`,
    );
  }
  return undefined;
}

export async function saveCheckpoint(c: {
  name: string;
  auto: boolean;
  row: InstanceRow;
  /** Whose identity the guest holds (secret placeholders, the CA it trusts). */
  identityOf: string;
  vm: Vm;
  backend: Backend;
  machine: MachineRecord;
  disk: { path: string; cloned: boolean };
  store: SnapshotStore;
  log: Logger;
  signal: AbortSignal;
}): Promise<Snapshot> {
  const { row, vm, backend } = c;
  if (!vm.saveSnapshot || !backend.copyDisk)
    throw new AegisError('UNSUPPORTED', `the ${backend.name} backend cannot checkpoint a running VM`);
  const refused = checkpointRefusal(row);
  if (refused) throw refused;
  const copyDisk = backend.copyDisk.bind(backend);
  const work = await c.store.begin(c.name);
  const t0 = Date.now();
  try {
    try {
      await vm.saveSnapshot(path.join(work, 'state'), c.signal);
      await copyDisk(c.disk.path, c.disk.cloned, path.join(work, 'disk'), c.signal);
    } finally {
      // Carries on whatever happened: a failed checkpoint must not leave it frozen.
      await vm
        .resume()
        .catch((err: unknown) => c.log.warn(`instance ${row.handle}: resume after a checkpoint failed: ${(err as Error).message}`));
    }
    const pausedMs = Date.now() - t0;
    const snap = await c.store.commit(work, {
      name: c.name,
      createdAt: Date.now(),
      auto: c.auto,
      machine: c.machine,
      instance: {
        id: row.id,
        handle: row.handle,
        command: row.command,
        workdir: row.workdir,
        network: row.network,
        image: row.image,
        env: row.spec.env,
        secrets: row.spec.secrets,
        ...(row.spec.user !== undefined ? { user: row.spec.user } : {}),
        ...(row.spec.labels ? { labels: row.spec.labels } : {}),
        ...(row.spec.egress ? { egress: row.spec.egress } : {}),
        guestPorts: row.ports.map((p) => p.guestPort),
        volumes: row.volumes,
        identityOf: c.identityOf,
      },
    });
    c.log.info(
      `instance ${row.handle} (${row.id}): snapshot ${c.name}: paused ${pausedMs} ms, state ${snap.meta.stateBytes} B, disk ${snap.meta.diskAllocatedBytes} B`,
    );
    return snap;
  } catch (err) {
    await c.store.abort(work);
    throw err;
  }
}
