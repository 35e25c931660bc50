import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError, type ErrorCode } from '@aegis/protocol';
import { Registry, type InstanceRow } from '../registry/db.js';
import { instanceRow } from '../../../../tests/support/rows.js';
import { MAX_VOLUME_MIB, VolumeService } from './service.js';
import type { VolumeMount } from './mounts.js';

let dir: string;
let registry: Registry;
let volumes: VolumeService;
const log = { info: () => undefined, warn: () => undefined };

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-volumes-test-'));
  registry = new Registry(path.join(dir, 'aegis.db'));
  volumes = new VolumeService(path.join(dir, 'volumes'), registry, log);
});

afterEach(() => {
  registry.close();
  fs.rmSync(dir, { recursive: true, force: true });
});

let n = 0;
function instance(state: InstanceRow['state'], mounts: VolumeMount[]): InstanceRow {
  const id = (++n).toString(16).padStart(16, '0');
  const row = instanceRow({ id, handle: `h${n}`, state, command: ['true'], createdAt: Date.now(), volumes: mounts });
  registry.insertInstance(row);
  return row;
}

const use = (name: string, readOnly = false): VolumeMount => ({ type: 'volume', source: name, target: '/v', readOnly });

async function code(p: Promise<unknown> | (() => unknown)): Promise<ErrorCode> {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (err) {
    expect(err).toBeInstanceOf(AegisError);
    return (err as AegisError).code;
  }
  throw new Error('expected a failure');
}

describe('VolumeService', () => {
  it('makes a sparse ext4 file of the asked size, owned by the daemon alone', async () => {
    const { volume, created } = await volumes.create('data', 64);
    expect(created).toBe(true);
    expect(volume).toMatchObject({ name: 'data', sizeMiB: 64, usedBy: [] });
    const st = fs.statSync(volumes.fileOf('data'));
    expect(st.size).toBe(64 << 20);
    expect(st.mode & 0o777).toBe(0o600);
    expect(volume.allocatedBytes).toBeLessThan(8 << 20); // sparse: the journal is not written out
    expect(execFileSync('dumpe2fs', ['-h', volumes.fileOf('data')], { stdio: ['ignore', 'pipe', 'ignore'] }).toString()).toMatch(
      /Filesystem features:.*has_journal/,
    );
  });

  it('returns an existing volume as docker volume create does, and refuses another size', async () => {
    await volumes.create('data', 32);
    expect((await volumes.create('data')).created).toBe(false);
    expect((await volumes.create('data', 32)).created).toBe(false);
    expect(await code(volumes.create('data', 64))).toBe('ALREADY_EXISTS');
  });

  it('makes one volume when two starts ask for the same missing one at once', async () => {
    const [a, b] = await Promise.all([volumes.create('cache'), volumes.create('cache')]);
    expect([a.created, b.created].sort()).toEqual([false, true]);
    expect(fs.readdirSync(path.join(dir, 'volumes'))).toEqual(['cache.ext4']);
  });

  it('refuses bad names and sizes with INVALID_ARGUMENT', async () => {
    expect(await code(volumes.create('../x'))).toBe('INVALID_ARGUMENT');
    expect(await code(volumes.create('ok', 8))).toBe('INVALID_ARGUMENT');
    expect(await code(volumes.get('nope'))).toBe('NOT_FOUND');
  });

  it('refuses a volume larger than the free space of its disk with RESOURCE_EXHAUSTED and the figures, leaving nothing', async () => {
    const st = fs.statfsSync(dir);
    const tooBig = Math.floor((st.bavail * st.bsize) / (1024 * 1024)) + 1024;
    // A disk with more free space than the largest volume cannot show this (the size check comes first).
    if (tooBig > MAX_VOLUME_MIB) return expect(await code(volumes.create('huge', tooBig))).toBe('INVALID_ARGUMENT');
    const err = await volumes.create('huge', tooBig).catch((e: unknown) => e as AegisError);
    expect(err).toMatchObject({ code: 'RESOURCE_EXHAUSTED' });
    expect((err as AegisError).message).toMatch(
      new RegExp(`^volume "huge" of ${tooBig} MiB would not fit: \\d+ MiB free on the disk holding `),
    );
    expect(await volumes.list()).toEqual([]);
    expect(fs.readdirSync(path.join(dir, 'volumes'))).toEqual([]);
  });

  it('refuses to remove a volume any instance names (running or stopped), then removes it and its file', async () => {
    await volumes.create('data', 16);
    const stopped = instance('stopped', [use('data')]);
    expect((await volumes.get('data')).usedBy).toEqual([stopped.handle]);
    expect(await code(volumes.remove('data'))).toBe('FAILED_PRECONDITION');
    registry.deleteInstance(stopped.id);
    await volumes.remove('data');
    expect(fs.existsSync(volumes.fileOf('data'))).toBe(false);
    expect(await code(volumes.remove('data'))).toBe('NOT_FOUND');
  });

  it('lets one live writer or many live readers attach; stopped instances hold nothing', async () => {
    await volumes.create('data', 16);
    instance('stopped', [use('data')]);
    expect(() => volumes.checkAttach([use('data')])).not.toThrow();
    const reader = instance('running', [use('data', true)]);
    expect(() => volumes.checkAttach([use('data', true)])).not.toThrow();
    expect(await code(() => volumes.checkAttach([use('data')]))).toBe('FAILED_PRECONDITION');
    registry.deleteInstance(reader.id);
    instance('starting', [use('data')]);
    expect(await code(() => volumes.checkAttach([use('data', true)]))).toBe('FAILED_PRECONDITION');
    expect(await code(() => volumes.checkAttach([use('gone')]))).toBe('FAILED_PRECONDITION');
  });

  it('gives the VMM disks for named volumes and shares for host directories, parents first', () => {
    const vm = volumes.vmVolumes([
      { ...use('data'), target: '/w/cache' },
      { type: 'bind', source: '/h', target: '/w', readOnly: true },
    ]);
    expect(vm).toEqual([
      { kind: 'share', hostPath: '/h', guestPath: '/w', readOnly: true },
      { kind: 'disk', hostPath: volumes.fileOf('data'), guestPath: '/w/cache', readOnly: false },
    ]);
  });

  it('removes the half-made files of a daemon killed while formatting', async () => {
    fs.mkdirSync(volumes.dir, { recursive: true });
    fs.writeFileSync(path.join(volumes.dir, 'x.ext4.tmp-0011aabb'), '');
    await volumes.create('kept', 16);
    await volumes.cleanup();
    expect(fs.readdirSync(volumes.dir)).toEqual(['kept.ext4']);
  });
});
