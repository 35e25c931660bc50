import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { LogStore } from '../../instances/logs.js';
import { follow } from './instances.js';

let dir: string;

beforeEach(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-follow-'));
});

afterEach(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('follow (the output stream of run and logs -f)', () => {
  it("a follower that starts after the workload's exit was reported still gets the output written just before it", async () => {
    for (let i = 0; i < 20; i++) {
      const store = new LogStore(path.join(dir, `out-${i}.ndjson`));
      // The guest's last output and then its exit, with the output not yet on disk: what
      // `aegis run -- echo hello` meets when the workload ends before run starts following.
      store.append('stdout', Buffer.from('hello\n'));
      store.workloadExited({ state: 'stopping', exitCode: 0 });
      const got: unknown[] = [];
      const write = (ev: unknown): undefined => void got.push(ev);
      const end = await follow(store, write, new AbortController().signal, { execs: false }, undefined, true);
      expect(end).toEqual({ state: 'stopping', exitCode: 0 });
      expect(got.map((e) => Buffer.from((e as { data: string }).data, 'base64').toString())).toEqual(['hello\n']);
      await store.settled();
    }
  });
});
