import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { AegisError, isAegisError, type ErrorCode } from '@aegis/protocol';
import { instanceRow } from '../../../../tests/support/rows.js';
import { Registry, SCHEMA_VERSION } from './db.js';

const row = instanceRow;

function errorOf(fn: () => unknown): AegisError {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(AegisError);
    return err as AegisError;
  }
  throw new Error('expected the call to throw');
}

function expectCode(fn: () => unknown, code: ErrorCode): AegisError {
  const err = errorOf(fn);
  expect(err.code).toBe(code);
  return err;
}

describe('Registry', () => {
  let dir: string;
  let file: string;
  const opened: Registry[] = [];

  function open(): Registry {
    const r = new Registry(file);
    opened.push(r);
    return r;
  }

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-registry-test-'));
    file = path.join(dir, 'registry.db');
  });

  afterEach(() => {
    for (const r of opened.splice(0)) {
      try {
        r.close();
      } catch {
        // already closed by the test
      }
    }
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('instances', () => {
    it('returns an inserted instance unchanged, with command and vmRecord parsed back from JSON', () => {
      const reg = open();
      const inserted = row({
        command: ['sh', '-c', 'echo "a b" && exit 3'],
        workdir: '/work',
        vmRecord: { pid: 4242, socket: '/run/x.sock', nested: { ok: true } },
      });
      reg.insertInstance(inserted);
      expect(reg.getInstance(inserted.id)).toEqual(inserted);
    });

    it('returns undefined for an id it does not hold', () => {
      expect(open().getInstance('ffffffffffffffff')).toBeUndefined();
    });

    it('applies a patch to only the fields it names', () => {
      const reg = open();
      reg.insertInstance(row());
      reg.updateInstance('0123456789abcdef', { state: 'running', startedAt: 1_700_000_000_500, vmRecord: { pid: 7 } });
      expect(reg.getInstance('0123456789abcdef')).toEqual(row({ state: 'running', startedAt: 1_700_000_000_500, vmRecord: { pid: 7 } }));

      reg.updateInstance('0123456789abcdef', { state: 'stopped', exitCode: 3, stateReason: 'exited', stoppedAt: 1_700_000_001_000 });
      expect(reg.getInstance('0123456789abcdef')).toEqual(
        row({
          state: 'stopped',
          startedAt: 1_700_000_000_500,
          vmRecord: { pid: 7 },
          exitCode: 3,
          stateReason: 'exited',
          stoppedAt: 1_700_000_001_000,
        }),
      );
    });

    it('clears vmRecord when patched with null', () => {
      const reg = open();
      reg.insertInstance(row({ vmRecord: { pid: 1 } }));
      reg.updateInstance('0123456789abcdef', { vmRecord: null });
      expect(reg.getInstance('0123456789abcdef')?.vmRecord).toBeNull();
    });

    it('accepts an empty patch and changes nothing visible', () => {
      const reg = open();
      reg.insertInstance(row());
      reg.updateInstance('0123456789abcdef', {});
      expect(reg.getInstance('0123456789abcdef')).toEqual(row());
    });

    it('ignores an update or delete for an unknown id', () => {
      const reg = open();
      reg.insertInstance(row());
      expect(() => reg.updateInstance('ffffffffffffffff', { state: 'failed' })).not.toThrow();
      expect(() => reg.deleteInstance('ffffffffffffffff')).not.toThrow();
      expect(reg.listInstances()).toEqual([row()]);
    });

    it('lists instances oldest first, whatever the insertion order', () => {
      const reg = open();
      reg.insertInstance(row({ id: 'bbbb000000000000', handle: 'second', createdAt: 2000 }));
      reg.insertInstance(row({ id: 'cccc000000000000', handle: 'third', createdAt: 3000 }));
      reg.insertInstance(row({ id: 'aaaa000000000000', handle: 'first', createdAt: 1000 }));
      expect(reg.listInstances().map((r) => r.handle)).toEqual(['first', 'second', 'third']);
    });

    it('returns an empty list when there are no instances', () => {
      expect(open().listInstances()).toEqual([]);
    });

    it('forgets a deleted instance, and frees its handle', () => {
      const reg = open();
      reg.insertInstance(row());
      reg.deleteInstance('0123456789abcdef');
      expect(reg.getInstance('0123456789abcdef')).toBeUndefined();
      expect(reg.listInstances()).toEqual([]);
      reg.insertInstance(row({ id: 'fedcba9876543210' }));
      expect(reg.resolveInstance('web').id).toBe('fedcba9876543210');
    });

    it('refuses a second instance with a taken handle with ALREADY_EXISTS, and keeps the first', () => {
      const reg = open();
      reg.insertInstance(row());
      const err = expectCode(() => reg.insertInstance(row({ id: 'fedcba9876543210' })), 'ALREADY_EXISTS');
      expect(err.httpStatus).toBe(409);
      expect(err.message).toContain('"web"');
      expect(reg.listInstances().map((r) => r.id)).toEqual(['0123456789abcdef']);
    });

    it('does not blame the handle when it is the id that is taken', () => {
      const reg = open();
      reg.insertInstance(row());
      let thrown: unknown;
      try {
        reg.insertInstance(row({ handle: 'other' }));
      } catch (err) {
        thrown = err;
      }
      expect(thrown).toBeDefined();
      expect(isAegisError(thrown, 'ALREADY_EXISTS')).toBe(false);
      expect(reg.resolveInstance('web').id).toBe('0123456789abcdef');
      expectCode(() => reg.resolveInstance('other'), 'NOT_FOUND');
    });
  });

  describe('volumes', () => {
    it("keeps an instance's volumes (host directories and named volumes) in order", () => {
      const reg = open();
      const volumes = [
        { type: 'bind' as const, source: '/home/me/src', target: '/src', readOnly: true },
        { type: 'volume' as const, source: 'cache', target: '/root/.cache', readOnly: false },
      ];
      reg.insertInstance(row({ volumes }));
      expect(reg.getInstance('0123456789abcdef')?.volumes).toEqual(volumes);
    });

    it('stores named volumes by name and refuses a taken one with ALREADY_EXISTS', () => {
      const reg = open();
      reg.insertVolume({ name: 'cache', sizeMiB: 1024, createdAt: 1 });
      reg.insertVolume({ name: 'a.b-c_d', sizeMiB: 16, createdAt: 2 });
      expect(reg.getVolume('cache')).toEqual({ name: 'cache', sizeMiB: 1024, createdAt: 1 });
      expect(reg.listVolumes().map((v) => v.name)).toEqual(['a.b-c_d', 'cache']);
      expectCode(() => reg.insertVolume({ name: 'cache', sizeMiB: 16, createdAt: 3 }), 'ALREADY_EXISTS');
      reg.deleteVolume('cache');
      expect(reg.getVolume('cache')).toBeUndefined();
    });
  });

  describe('resolveInstance', () => {
    let reg: Registry;

    beforeEach(() => {
      reg = open();
      reg.insertInstance(row({ id: 'abc1230000000000', handle: 'alpha', createdAt: 1 }));
      reg.insertInstance(row({ id: 'abc4560000000000', handle: 'beta', createdAt: 2 }));
      reg.insertInstance(row({ id: 'def7890000000000', handle: 'gamma', createdAt: 3 }));
    });

    it('finds an instance by its handle', () => {
      expect(reg.resolveInstance('beta').id).toBe('abc4560000000000');
    });

    it('finds an instance by its full id', () => {
      expect(reg.resolveInstance('def7890000000000').handle).toBe('gamma');
    });

    it('finds an instance by a unique id prefix', () => {
      expect(reg.resolveInstance('abc4').handle).toBe('beta');
      expect(reg.resolveInstance('d').handle).toBe('gamma');
    });

    it('prefers a handle over an id prefix it also happens to be', () => {
      reg.insertInstance(row({ id: '9990000000000000', handle: 'def7' }));
      expect(reg.resolveInstance('def7').id).toBe('9990000000000000');
    });

    it('refuses an ambiguous id prefix with INVALID_ARGUMENT', () => {
      const err = expectCode(() => reg.resolveInstance('abc'), 'INVALID_ARGUMENT');
      expect(err.message).toContain('more than one');
    });

    it('reports an unknown reference as NOT_FOUND', () => {
      const err = expectCode(() => reg.resolveInstance('nope'), 'NOT_FOUND');
      expect(err.httpStatus).toBe(404);
      expect(err.message).toContain('"nope"');
    });

    it('treats LIKE wildcards in a reference literally', () => {
      for (const ref of ['%', '_', '%%', '___', 'abc%', 'abc_', '_bc', '%0']) {
        expectCode(() => reg.resolveInstance(ref), 'NOT_FOUND');
      }
    });

    it('treats a backslash in a reference literally', () => {
      expectCode(() => reg.resolveInstance('\\'), 'NOT_FOUND');
      expectCode(() => reg.resolveInstance('abc\\'), 'NOT_FOUND');
    });

    it('still matches an id containing an underscore or percent sign literally', () => {
      reg.insertInstance(row({ id: 'x_y%z', handle: 'odd' }));
      expect(reg.resolveInstance('x_y%').handle).toBe('odd');
      expectCode(() => reg.resolveInstance('xay'), 'NOT_FOUND');
    });

    it('is not fooled by a wildcard when only one instance exists', () => {
      // With a single row, an unescaped '%' or '_' would resolve to it instead of failing.
      reg.deleteInstance('abc1230000000000');
      reg.deleteInstance('abc4560000000000');
      expect(reg.listInstances()).toHaveLength(1);
      expectCode(() => reg.resolveInstance('%'), 'NOT_FOUND');
      expectCode(() => reg.resolveInstance('_'), 'NOT_FOUND');
      expectCode(() => reg.resolveInstance('def_'), 'NOT_FOUND');
    });
  });

  describe('the database file', () => {
    it('is shared: a second Registry on the same file sees the first one’s rows', () => {
      const a = open();
      a.insertInstance(row());
      const b = open();
      expect(b.getInstance('0123456789abcdef')).toEqual(row());
      b.updateInstance('0123456789abcdef', { state: 'running' });
      expect(a.getInstance('0123456789abcdef')?.state).toBe('running');
    });

    it('survives closing and reopening, without re-running migrations', () => {
      const a = open();
      a.insertInstance(row());
      a.close();
      // Re-running migration 1 would fail with "table instances already exists".
      const b = open();
      expect(b.listInstances()).toEqual([row()]);
      b.close();

      const raw = new Database(file, { readonly: true });
      try {
        expect(raw.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
      } finally {
        raw.close();
      }
    });

    it('records the schema version in user_version on a fresh file', () => {
      open().close();
      const raw = new Database(file, { readonly: true });
      try {
        expect(raw.pragma('user_version', { simple: true })).toBe(SCHEMA_VERSION);
        const tables = raw.prepare("SELECT name FROM sqlite_master WHERE type = 'table'").all() as { name: string }[];
        expect(tables.map((t) => t.name)).toContain('instances');
      } finally {
        raw.close();
      }
    });

    it('is in WAL journal mode', () => {
      open();
      const raw = new Database(file);
      try {
        expect(raw.pragma('journal_mode', { simple: true })).toBe('wal');
      } finally {
        raw.close();
      }
      expect(fs.existsSync(`${file}-wal`)).toBe(true);
    });

    it('refuses a file whose schema is newer than this build, with FAILED_PRECONDITION', () => {
      open().close();
      const raw = new Database(file);
      raw.pragma('user_version = 99');
      raw.close();
      const err = expectCode(() => new Registry(file), 'FAILED_PRECONDITION');
      expect(err.message).toMatch(/v99 is newer/);
    });
  });
});
