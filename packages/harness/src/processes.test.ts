/**
 * Exit reporting against real host processes: GuestProcess.start needs no guest for a
 * command without an image (only `tty` and `image` reach for aegis-init).
 */
import { afterEach, describe, expect, it } from 'vitest';
import type { ExitEvent, Stream } from '@aegis/protocol';
import { GuestProcess, OutputGate, PIPE_IDLE_GRACE_MS } from './processes.js';

type Event = { kind: 'output'; stream: Stream; data: string } | { kind: 'exit'; exit: ExitEvent };

const groups: number[] = [];
afterEach(() => {
  for (const pgid of groups.splice(0)) {
    try {
      process.kill(-pgid, 'SIGKILL');
    } catch {
      // the group is already gone
    }
  }
});

async function run(command: string[]): Promise<{ gp: GuestProcess; events: Event[]; exited: Promise<void> }> {
  const events: Event[] = [];
  let markExited!: () => void;
  const exited = new Promise<void>((r) => (markExited = r));
  const gp = await GuestProcess.start(
    { command, env: {} },
    {
      onOutput: (stream, data) => events.push({ kind: 'output', stream, data: data.toString() }),
      onExit: (exit) => {
        events.push({ kind: 'exit', exit });
        markExited();
      },
    },
  );
  // The background children live in the process's group; it must not outlive the test.
  groups.push(gp.pid);
  return { gp, events, exited };
}

describe('GuestProcess exit reporting', () => {
  it('reports the exit once, not again when the pipes a background child holds are destroyed', async () => {
    const { events, exited } = await run(['sh', '-c', 'sleep 5 & echo hi']);
    await exited;
    // Long enough for the 'close' that follows destroying the pipes.
    await new Promise((r) => setTimeout(r, 300));
    const exits = events.filter((e) => e.kind === 'exit');
    // The pipes are held by `sleep`: after the idle grace they are cut, and the exit says so.
    expect(exits).toEqual([{ kind: 'exit', exit: { exitCode: 0, signal: null, bytes: { stdout: 3, stderr: 0 }, truncated: true } }]);
    const hi = events.findIndex((e) => e.kind === 'output' && e.stream === 'stdout' && e.data.includes('hi'));
    expect(hi).toBeGreaterThanOrEqual(0);
    expect(hi).toBeLessThan(events.findIndex((e) => e.kind === 'exit'));
  });

  it('delivers all output written before the exit ahead of the exit report when the pipes close in time', async () => {
    const bytes = 1 << 20;
    const { events, exited } = await run(['sh', '-c', `head -c ${bytes} /dev/zero; echo done >&2; exit 3`]);
    await exited;
    await new Promise((r) => setTimeout(r, 200));
    const exitAt = events.findIndex((e) => e.kind === 'exit');
    const before = events.slice(0, exitAt);
    const stdoutBytes = before.reduce((n, e) => n + (e.kind === 'output' && e.stream === 'stdout' ? e.data.length : 0), 0);
    expect(stdoutBytes).toBe(bytes);
    expect(before.some((e) => e.kind === 'output' && e.stream === 'stderr' && e.data.includes('done'))).toBe(true);
    expect(events.slice(exitAt)).toEqual([{ kind: 'exit', exit: { exitCode: 3, signal: null, bytes: { stdout: bytes, stderr: 5 } } }]);
  });

  // Regression: the pipes were destroyed 100 ms after the exit, and whatever was still in them
  // was lost (24 of 250 concurrent execs lost their last line under load).
  it('loses no byte written before the exit, however long the reader was held back', async () => {
    const gate = new OutputGate();
    gate.pause(); // the host is slow: nothing is read for a while
    const total = 3_000_000;
    const events: Event[] = [];
    let markExited!: () => void;
    const exited = new Promise<void>((r) => (markExited = r));
    const gp = await GuestProcess.start(
      { command: ['sh', '-c', `head -c ${total} /dev/zero | tr '\\0' a; echo last line`], env: {} },
      {
        onOutput: (stream, data) => events.push({ kind: 'output', stream, data: data.toString() }),
        onExit: (exit) => {
          events.push({ kind: 'exit', exit });
          markExited();
        },
      },
      gate,
    );
    groups.push(gp.pid);
    await new Promise((r) => setTimeout(r, PIPE_IDLE_GRACE_MS + 500));
    expect(events).toEqual([]); // the writer is blocked in write(2): no output, no exit yet
    gate.resume();
    await exited;
    const out = events.flatMap((e) => (e.kind === 'output' ? [e.data] : [])).join('');
    expect(out.length).toBe(total + 'last line\n'.length);
    expect(out.endsWith('alast line\n')).toBe(true);
    const exit = events.at(-1);
    expect(exit).toEqual({ kind: 'exit', exit: { exitCode: 0, signal: null, bytes: { stdout: total + 10, stderr: 0 } } });
  });
});
