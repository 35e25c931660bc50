/**
 * The host end of the agent channel against a scripted guest writing raw lines: what a broken
 * or hostile harness can do with the channel, and what reaches the daemon's log of it.
 */
import { describe, expect, it } from 'vitest';
import type { AegisError, GuestEvents } from '@aegis/protocol';
import type { Duplex } from 'node:stream';
import { duplexPair } from '../../../../tests/support/fake-vmm.js';
import { AGENT_MAX_PROTOCOL_ERRORS, AGENT_REPORTED_PROTOCOL_ERRORS, AgentConnection } from './agent.js';

interface Rig {
  agent: AgentConnection;
  guest: Duplex;
  host: Duplex;
  events: { event: keyof GuestEvents; params: unknown }[];
  reports: AegisError[];
  /** Lines the host wrote to the guest. */
  sent: string[];
}

function rig(): Rig {
  const [host, guest] = duplexPair();
  const events: Rig['events'] = [];
  const reports: AegisError[] = [];
  const agent = new AgentConnection(
    host,
    (event, params) => events.push({ event, params }),
    (err) => reports.push(err),
  );
  const sent: string[] = [];
  let buf = '';
  guest.on('data', (c: Buffer) => {
    buf += c.toString();
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      sent.push(buf.slice(0, nl));
      buf = buf.slice(nl + 1);
    }
  });
  return { agent, guest, host, events, reports, sent };
}

const tick = (): Promise<void> => new Promise((r) => setTimeout(r, 5));

/** Whether `s` holds a character that must not reach a log line raw (newline, CR, ESC, RLO). */
const hasRaw = (s: string): boolean => ['\n', '\r', '\x1b', '\u202e'].some((c) => s.includes(c));

describe('AgentConnection', () => {
  it('a guest that sends malformed lines without end has its channel closed at the threshold, with a few reports and one closing line instead of one per error', async () => {
    const r = rig();
    const lines = Array.from({ length: 3 * AGENT_MAX_PROTOCOL_ERRORS }, (_, i) => `garbage ${i}\n`).join('');
    r.guest.write(lines);
    await r.agent.closed;
    expect(r.host.destroyed).toBe(true);
    expect(r.agent.closedForProtocolErrors).toBe(true);
    expect(r.reports).toHaveLength(AGENT_REPORTED_PROTOCOL_ERRORS + 1);
    expect(r.reports.at(-2)?.message).toMatch(/further bad messages are counted, not reported/);
    const last = r.reports.at(-1) as AegisError;
    expect(last.code).toBe('RESOURCE_EXHAUSTED');
    expect(last.message).toMatch(new RegExp(`^${AGENT_MAX_PROTOCOL_ERRORS} bad messages from the guest .*closing the agent channel$`));
    // Nothing after the close is read, answered or reported.
    const answered = r.sent.length;
    expect(answered).toBeLessThanOrEqual(AGENT_MAX_PROTOCOL_ERRORS);
    await tick();
    expect(r.reports).toHaveLength(AGENT_REPORTED_PROTOCOL_ERRORS + 1);
    await expect(r.agent.call('health', {})).rejects.toMatchObject({ code: 'UNAVAILABLE' });
  });

  it('counts what else the contract forbids toward the threshold: unknown events, bad events, and requests from the guest', async () => {
    const r = rig();
    const bad = [
      JSON.stringify({ jsonrpc: '2.0', method: 'launchMissiles', params: {} }),
      JSON.stringify({ jsonrpc: '2.0', method: 'exit', params: { exitCode: 0, signal: null, extra: 1 } }),
      JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'run', params: {} }),
    ];
    for (const line of bad) {
      r.guest.write(`${line}\n`);
      await tick();
    }
    for (let i = bad.length; i < AGENT_MAX_PROTOCOL_ERRORS - 1; i++) r.guest.write(`${bad[i % bad.length]}\n`);
    await tick();
    expect(r.agent.closedForProtocolErrors).toBe(false);
    expect(r.events).toEqual([]);
    expect(r.reports.map((e) => e.message).slice(0, 3)).toEqual([
      'unknown guest event launchMissiles',
      'bad exit event: exit: unknown field "extra"',
      'the guest sent a request (run)',
    ]);
    expect(r.reports).toHaveLength(AGENT_REPORTED_PROTOCOL_ERRORS);
    // The guest's request was refused, not served.
    expect(r.sent.some((l) => JSON.parse(l).id === 1 && JSON.parse(l).error?.data?.code === 'UNSUPPORTED')).toBe(true);
    r.guest.write(`${bad[0]}\n`);
    await r.agent.closed;
    expect(r.agent.closedForProtocolErrors).toBe(true);
  });

  it('guest text never reaches a report raw: control characters are escaped and long text is cut', async () => {
    const r = rig();
    const forged = 'x\n2030-01-01T00:00:00.000Z info instance other: stopped\r\x1b[2J\u202e';
    r.guest.write(`${JSON.stringify({ jsonrpc: '2.0', method: forged, params: {} })}\n`);
    r.guest.write(`${JSON.stringify({ jsonrpc: '2.0', id: null, error: { code: 1, message: forged + 'y'.repeat(10_000) } })}\n`);
    r.guest.write(`${JSON.stringify({ jsonrpc: '2.0', method: 'output', params: { stream: 'stdout', data: 'aGk=', [forged]: 1 } })}\n`);
    await tick();
    expect(r.reports).toHaveLength(3);
    for (const e of r.reports) {
      expect(hasRaw(e.message)).toBe(false);
      expect(e.message.length).toBeLessThan(300);
    }
    expect(r.reports[0]?.message).toContain('x\\n2030-01-01T00:00:00.000Z info instance other: stopped\\r\\x1b[2J\\u202e');
    expect(r.reports[1]?.message).toMatch(/…\[\d+ more chars\]$/);

    // An error the guest answers a call with is escaped too (it may end up in the daemon's log).
    const pending = r.agent.call('health', {});
    await tick();
    const id = JSON.parse(r.sent.at(-1) ?? '{}').id as number;
    r.guest.write(
      `${JSON.stringify({ jsonrpc: '2.0', id, error: { code: -32603, message: forged, data: { code: 'INTERNAL', message: forged } } })}\n`,
    );
    const err = (await pending.catch((e: unknown) => e)) as AegisError;
    expect(err.code).toBe('INTERNAL');
    expect(hasRaw(err.message)).toBe(false);
    expect(err.message).toContain('\\n2030');
  });

  it('takes a line as long as the largest output event (16 MiB of base64), and drops a longer one', async () => {
    const r = rig();
    const data = Buffer.alloc(12 << 20, 0x5a).toString('base64');
    expect(data.length).toBe(16 << 20);
    const line = Buffer.from(`${JSON.stringify({ jsonrpc: '2.0', method: 'output', params: { stream: 'stdout', data } })}\n`);
    for (let off = 0; off < line.length; off += 1 << 20) r.guest.write(line.subarray(off, off + (1 << 20)));
    await tick();
    expect(r.reports).toEqual([]);
    expect(r.events).toHaveLength(1);
    expect((r.events[0]?.params as { data: string }).data === data).toBe(true);

    const huge = Buffer.alloc(25 << 20, 0x61);
    for (let off = 0; off < huge.length; off += 1 << 20) r.guest.write(huge.subarray(off, off + (1 << 20)));
    r.guest.write('\n');
    await tick();
    expect(r.reports.map((e) => e.message)).toEqual(['1 oversized line(s) dropped']);
  });

  it('accepts every event the harness sends, with the fields it sends', async () => {
    const r = rig();
    const events = [
      ['ready', { version: 1 }],
      ['output', { stream: 'stderr', data: 'aGk=' }],
      ['output', { execId: 'e1', stream: 'stdout', data: '' }],
      ['exit', { exitCode: 0, signal: null, bytes: { stdout: 2, stderr: 0 } }],
      ['execExit', { execId: 'e1', exitCode: null, signal: 'SIGKILL', bytes: { stdout: 0, stderr: 0 }, truncated: true, durationMs: 12 }],
    ] as const;
    for (const [method, params] of events) r.guest.write(`${JSON.stringify({ jsonrpc: '2.0', method, params })}\n`);
    await tick();
    expect(r.reports).toEqual([]);
    expect(r.events).toEqual(events.map(([event, params]) => ({ event, params })));
  });

  it('pause stops reading the channel until resume', async () => {
    const r = rig();
    r.agent.pause();
    r.guest.write(`${JSON.stringify({ jsonrpc: '2.0', method: 'ready', params: { version: 1 } })}\n`);
    await tick();
    expect(r.events).toEqual([]);
    r.agent.resume();
    await tick();
    expect(r.events).toEqual([{ event: 'ready', params: { version: 1 } }]);
  });
});
