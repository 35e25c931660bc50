import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { LogStore, fileSize, type LogEnd, type LogEntry } from './logs.js';

async function collect(it: AsyncIterable<LogEntry>): Promise<LogEntry[]> {
  const out: LogEntry[] = [];
  for await (const e of it) out.push(e);
  return out;
}

function decoded(entries: LogEntry[]): string[] {
  return entries.map((e) => `${e.stream}:${Buffer.from(e.data, 'base64').toString('utf8')}`);
}

describe('LogStore', () => {
  let dir: string;
  let file: string;
  let store: LogStore;

  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-logs-test-'));
    file = path.join(dir, 'output.ndjson');
    store = new LogStore(file);
  });

  afterEach(() => {
    store.removeAllListeners();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  describe('append and read', () => {
    it('reads back appended chunks in order, as base64 with their stream and time', async () => {
      const before = Date.now();
      store.append('stdout', Buffer.from('hello\n'));
      store.append('stderr', Buffer.from('oops\n'));
      store.append('stdout', Buffer.from('bye'));
      await store.settled();
      const after = Date.now();

      const entries = await collect(store.read());
      expect(entries.map((e) => [e.stream, e.data])).toEqual([
        ['stdout', Buffer.from('hello\n').toString('base64')],
        ['stderr', Buffer.from('oops\n').toString('base64')],
        ['stdout', Buffer.from('bye').toString('base64')],
      ]);
      for (const e of entries) {
        expect(e.timeMs).toBeGreaterThanOrEqual(before);
        expect(e.timeMs).toBeLessThanOrEqual(after);
      }
    });

    it('keeps arbitrary bytes intact, including invalid UTF-8 and newlines', async () => {
      const bytes = Buffer.from([0x00, 0xff, 0xfe, 0x0a, 0x0d, 0x80, 0x7b]);
      store.append('stdout', bytes);
      await store.settled();
      const entries = await collect(store.read());
      expect(Buffer.concat(entries.map((e) => Buffer.from(e.data, 'base64')))).toEqual(bytes);
    });

    it('stores one entry per line, so tail counts lines', async () => {
      store.append('stdout', Buffer.from('one\ntwo\nthr'));
      store.append('stdout', Buffer.from('ee\n'));
      await store.settled();
      expect(decoded(await collect(store.read()))).toEqual(['stdout:one\n', 'stdout:two\n', 'stdout:thr', 'stdout:ee\n']);
      expect(decoded(await collect(store.read(2)))).toEqual(['stdout:thr', 'stdout:ee\n']);
    });

    it('writes one NDJSON line per chunk to a file only its owner can read', async () => {
      store.append('stdout', Buffer.from('a'));
      store.append('stderr', Buffer.from('b'));
      await store.settled();
      const lines = fs.readFileSync(file, 'utf8').split('\n');
      expect(lines).toHaveLength(3);
      expect(lines[2]).toBe('');
      expect(JSON.parse(lines[0] ?? '')).toEqual({ t: expect.any(Number) as unknown, s: 'stdout', d: 'YQ==' });
      expect(fs.statSync(file).mode & 0o777).toBe(0o600);
    });

    it('emits each appended entry, identical to what read returns later', async () => {
      const emitted: LogEntry[] = [];
      store.on('entry', (e) => emitted.push(e));
      store.append('stdout', Buffer.from('one'));
      store.append('stderr', Buffer.from('two'));
      await store.settled();
      expect(decoded(emitted)).toEqual(['stdout:one', 'stderr:two']);
      expect(await collect(store.read())).toEqual(emitted);
    });

    it('has the entry on disk by the time the entry event fires', async () => {
      let sizeAtEvent = -1;
      store.on('entry', () => (sizeAtEvent = fileSize(file)));
      store.append('stdout', Buffer.from('x'));
      await store.settled();
      expect(sizeAtEvent).toBe(fileSize(file));
      expect(sizeAtEvent).toBeGreaterThan(0);
    });

    it('yields nothing for an instance that has no output file yet', async () => {
      expect(fs.existsSync(file)).toBe(false);
      expect(await collect(store.read())).toEqual([]);
      expect(await collect(store.read(5))).toEqual([]);
    });

    it('is readable by a second store on the same file, as after a daemon restart', async () => {
      store.append('stdout', Buffer.from('before restart'));
      await store.settled();
      const again = new LogStore(file);
      again.append('stdout', Buffer.from('after restart'));
      await again.settled();
      expect(decoded(await collect(again.read()))).toEqual(['stdout:before restart', 'stdout:after restart']);
    });
  });

  describe('tail', () => {
    beforeEach(async () => {
      for (let i = 1; i <= 5; i++) store.append('stdout', Buffer.from(`line ${i}`));
      await store.settled();
    });

    it('keeps only the last N entries, oldest first', async () => {
      expect(decoded(await collect(store.read(2)))).toEqual(['stdout:line 4', 'stdout:line 5']);
    });

    it('returns everything when N is at least the number of entries', async () => {
      expect(await collect(store.read(5))).toHaveLength(5);
      expect(await collect(store.read(100))).toHaveLength(5);
    });

    it('returns nothing for a tail of 0', async () => {
      expect(await collect(store.read(0))).toEqual([]);
    });

    it('does not count unreadable lines against the tail', async () => {
      fs.appendFileSync(file, 'not json\n{"t":1,"s":"stdin","d":""}\n');
      expect(decoded(await collect(store.read(2)))).toEqual(['stdout:line 4', 'stdout:line 5']);
    });
  });

  describe('uptoBytes', () => {
    it('stops at the given byte count, ignoring entries appended after it', async () => {
      store.append('stdout', Buffer.from('first'));
      store.append('stdout', Buffer.from('second'));
      await store.settled();
      const size = fileSize(file);
      store.append('stdout', Buffer.from('third'));
      await store.settled();
      expect(decoded(await collect(store.read(undefined, { workload: size, execs: 0 })))).toEqual(['stdout:first', 'stdout:second']);
      expect(decoded(await collect(store.read(1, { workload: size, execs: 0 })))).toEqual(['stdout:second']);
    });

    it('drops a line cut short by the byte limit rather than yielding half of it', async () => {
      store.append('stdout', Buffer.from('first'));
      await store.settled();
      const afterFirst = fileSize(file);
      store.append('stdout', Buffer.from('second'));
      await store.settled();
      const entries = await collect(store.read(undefined, { workload: afterFirst + 10, execs: 0 }));
      expect(decoded(entries)).toEqual(['stdout:first']);
    });

    it('yields nothing for a limit of 0 bytes', async () => {
      store.append('stdout', Buffer.from('first'));
      await store.settled();
      expect(await collect(store.read(undefined, { workload: 0, execs: 0 }))).toEqual([]);
    });

    it('reads the whole file when the limit is beyond its end', async () => {
      store.append('stdout', Buffer.from('first'));
      await store.settled();
      expect(decoded(await collect(store.read(undefined, { workload: fileSize(file) + 1000, execs: 0 })))).toEqual(['stdout:first']);
    });
  });

  describe('damaged files', () => {
    it('skips a torn last line left by a crash', async () => {
      store.append('stdout', Buffer.from('complete'));
      await store.settled();
      fs.appendFileSync(file, '{"t":1700000000000,"s":"stdout","d":"aGVs');
      expect(decoded(await collect(store.read()))).toEqual(['stdout:complete']);
      expect(decoded(await collect(store.read(10)))).toEqual(['stdout:complete']);
    });

    it('skips lines that are JSON but not a log entry', async () => {
      fs.appendFileSync(
        file,
        [
          '{"t":"1","s":"stdout","d":""}',
          '{"t":1,"s":"stdin","d":""}',
          '{"t":1,"s":"stdout","d":7}',
          'null',
          '[]',
          '',
          '{"t":2,"s":"stderr","d":"b2s="}',
        ].join('\n') + '\n',
      );
      expect(decoded(await collect(store.read()))).toEqual(['stderr:ok']);
    });

    // Regression: the first entry written after a crash used to be glued onto the torn line.
    it('keeps the next entry appended after a torn line, once the daemon restarts', async () => {
      store.append('stdout', Buffer.from('before crash'));
      await store.settled();
      fs.appendFileSync(file, '{"t":1700000000000,"s":"stdout","d":"aGVs');
      const restarted = new LogStore(file);
      restarted.append('stdout', Buffer.from('after restart'));
      await restarted.settled();
      expect(decoded(await collect(restarted.read()))).toEqual(['stdout:before crash', 'stdout:after restart']);
    });
  });

  describe('end', () => {
    it('has no end info before the workload ends', () => {
      expect(store.endInfo).toBeUndefined();
    });

    it('emits end once, after every entry is on disk, and keeps the first end info', async () => {
      const events: string[] = [];
      store.on('entry', () => events.push('entry'));
      store.on('end', (e) => events.push(`end ${e.state}`));
      const first: LogEnd = { state: 'stopped', exitCode: 0 };
      store.append('stdout', Buffer.from('last words\n'));
      store.end(first);
      store.end({ state: 'failed', exitCode: null, stateReason: 'later' });
      await store.settled();
      await new Promise((r) => setImmediate(r));
      expect(events).toEqual(['entry', 'end stopped']);
      expect(store.endInfo).toEqual(first);
    });

    it('keeps the end info for a listener that subscribes afterwards', () => {
      store.end({ state: 'failed', exitCode: null, stateReason: 'VM crashed' });
      let late: LogEnd | undefined;
      store.on('end', (e) => (late = e));
      expect(late).toBeUndefined();
      expect(store.endInfo).toEqual({ state: 'failed', exitCode: null, stateReason: 'VM crashed' });
    });

    it('allows any number of followers without a max-listeners warning', () => {
      expect(store.getMaxListeners()).toBe(0);
    });
  });
});

describe('fileSize', () => {
  it('is 0 for a file that does not exist', () => {
    expect(fileSize(path.join(os.tmpdir(), 'aegis-no-such-file-' + process.pid))).toBe(0);
  });
});

describe('LogStore bounds and filters', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-logs-bound-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('rotates past the bound, keeps one generation, and reads both in order', async () => {
    const file = path.join(dir, 'output.ndjson');
    const store = new LogStore(file, 1000);
    for (let i = 0; i < 40; i++) store.append('stdout', Buffer.from(`chunk ${i} `.padEnd(40, '.')));
    await store.settled();
    expect(fs.statSync(file).size).toBeLessThanOrEqual(1000);
    expect(fs.statSync(`${file}.1`).size).toBeLessThanOrEqual(1000);
    const got = (await collect(store.read())).map((e) => Buffer.from(e.data, 'base64').toString().split(' ')[1]);
    // The oldest chunks are gone; what is kept is the newest, contiguous and in order.
    expect(got.at(-1)).toBe('39');
    expect(got).toEqual(got.map((_, i) => String(40 - got.length + i)));
    expect(got.length).toBeGreaterThan(10);
  });

  it('marks exec output and leaves it out unless asked', async () => {
    const store = new LogStore(path.join(dir, 'o.ndjson'));
    store.append('stdout', Buffer.from('workload'));
    store.append('stderr', Buffer.from('exec'), 'e1');
    await store.settled();
    expect((await collect(store.read())).map((e) => e.execId)).toEqual([undefined]);
    expect((await collect(store.read(undefined, undefined, { execs: true }))).map((e) => e.execId)).toEqual([undefined, 'e1']);
  });

  it('filters by time with since', async () => {
    const file = path.join(dir, 's.ndjson');
    fs.writeFileSync(file, ['{"t":1000,"s":"stdout","d":"YQ=="}', '{"t":2000,"s":"stdout","d":"Yg=="}'].join('\n') + '\n');
    const store = new LogStore(file);
    expect((await collect(store.read(undefined, undefined, { sinceMs: 1500 }))).map((e) => e.timeMs)).toEqual([2000]);
  });
});

describe('LogStore under pressure', () => {
  let dir: string;
  beforeEach(() => {
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'aegis-logs-pressure-'));
  });
  afterEach(() => fs.rmSync(dir, { recursive: true, force: true }));

  // Regression: two execs that printed 20 MB each rotated away the workload's first line.
  it("exec output cannot evict the workload's output: each has its own bound", async () => {
    const store = new LogStore(path.join(dir, 'output.ndjson'), 2000);
    store.append('stdout', Buffer.from('the workload said this first\n'));
    for (let i = 0; i < 200; i++) store.append('stdout', Buffer.from(`exec line ${i}\n`), 'e1');
    await store.settled();
    const workload = await collect(store.read());
    expect(decoded(workload)).toEqual(['stdout:the workload said this first\n']);
    expect(fs.statSync(store.execsFile).size).toBeLessThanOrEqual(2000);
  });

  // Regression: one appendFileSync per line blocked the daemon's event loop (`yes ''` froze the API).
  it('does not write on the caller’s turn: appends return at once and land in batches', async () => {
    const store = new LogStore(path.join(dir, 'output.ndjson'));
    for (let i = 0; i < 10_000; i++) store.append('stdout', Buffer.from('\n'));
    expect(fileSize(store.file)).toBe(0);
    await store.settled();
    expect(await collect(store.read())).toHaveLength(10_000);
  });

  it('reports congestion past its high-water mark and drains', async () => {
    const store = new LogStore(path.join(dir, 'output.ndjson'), 64 << 20);
    const chunk = Buffer.alloc(64 * 1024, 0x61);
    let accepted = true;
    for (let i = 0; i < 100 && accepted; i++) accepted = store.append('stdout', chunk);
    expect(accepted).toBe(false);
    const drained = new Promise<void>((r) => store.once('drain', () => r()));
    await drained;
    expect(store.congested).toBe(false);
  });

  it('drops what a full disk will not take, says so once, and keeps going', async () => {
    const failures: string[] = [];
    const store = new LogStore('/dev/full', 1 << 30, (m) => failures.push(m));
    store.append('stdout', Buffer.from('lost\n'));
    await store.settled();
    store.append('stdout', Buffer.from('lost too\n'));
    await store.settled();
    expect(store.droppedBytes).toBeGreaterThan(0);
    expect(failures).toHaveLength(1);
    expect(failures[0]).toMatch(/output not stored/);
  });
});
