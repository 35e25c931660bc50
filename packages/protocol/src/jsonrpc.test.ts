import { describe, expect, it } from 'vitest';
import { AegisError } from './errors.js';
import { LineDecoder, errorFromFailure, failure, parseMessage } from './jsonrpc.js';
import { RpcPeer } from './rpc-peer.js';

describe('LineDecoder', () => {
  it('reassembles lines split across chunks, in order', () => {
    const d = new LineDecoder();
    expect(d.push(Buffer.from('{"a":')).lines).toEqual([]);
    expect(d.push(Buffer.from('1}\n{"b"')).lines).toEqual(['{"a":1}']);
    expect(d.push(Buffer.from(':2}\n\n')).lines).toEqual(['{"b":2}', '']);
  });

  it('keeps a multibyte character split between chunks intact', () => {
    const d = new LineDecoder();
    const bytes = Buffer.from('héllo\n');
    expect(d.push(bytes.subarray(0, 2)).lines).toEqual([]);
    expect(d.push(bytes.subarray(2)).lines).toEqual(['héllo']);
  });

  it('counts a line over the limit once, however many chunks it spans', () => {
    const d = new LineDecoder(8);
    const counts = [d.push(Buffer.from('0123456789')), d.push(Buffer.from('0123456789')), d.push(Buffer.from('abc\nok\n'))];
    expect(counts.map((r) => r.oversized)).toEqual([1, 0, 0]);
    expect(counts[2]?.lines).toEqual(['ok']);
  });

  it('drops a line over the limit and recovers on the next one', () => {
    const d = new LineDecoder(8);
    const r1 = d.push(Buffer.from('0123456789'));
    expect(r1.oversized).toBe(1);
    const r2 = d.push(Buffer.from('abc\nok\n'));
    expect(r2.lines).toEqual(['ok']);
  });
});

describe('parseMessage', () => {
  it('rejects what is not a JSON-RPC 2.0 envelope', () => {
    for (const bad of [null, [], 'x', { jsonrpc: '1.0', method: 'a' }, { jsonrpc: '2.0', id: {}, method: 'a' }, { jsonrpc: '2.0' }]) {
      expect(() => parseMessage(bad)).toThrow(AegisError);
    }
  });

  it('classifies requests, notifications and responses', () => {
    expect(parseMessage({ jsonrpc: '2.0', id: 1, method: 'run' })).toHaveProperty('id', 1);
    expect(parseMessage({ jsonrpc: '2.0', method: 'output' })).not.toHaveProperty('id');
    expect(parseMessage({ jsonrpc: '2.0', id: 1, result: null })).toHaveProperty('result', null);
  });
});

describe('parseMessage from an untrusted peer', () => {
  it('refuses unknown top-level members, for every kind of message', () => {
    for (const m of [
      { jsonrpc: '2.0', method: 'output', params: {}, extra: 1 },
      { jsonrpc: '2.0', id: 1, method: 'run', params: {}, extra: 1 },
      { jsonrpc: '2.0', id: 1, result: {}, extra: 1 },
      { jsonrpc: '2.0', id: 1, error: { code: 1, message: 'm' }, extra: 1 },
      { jsonrpc: '2.0', id: 1, result: {}, error: { code: 1, message: 'm' } },
      { jsonrpc: '2.0', method: 'output', result: {} },
    ]) {
      expect(() => parseMessage(m), JSON.stringify(m)).toThrow(AegisError);
    }
    expect(() => parseMessage({ jsonrpc: '2.0', id: 1, result: 1, extra: 1 })).toThrow(/response: unknown member "extra"/);
  });

  it('refuses a malformed error object, ids that are not integers or short strings, long methods and scalar params', () => {
    for (const m of [
      { jsonrpc: '2.0', id: 1, error: { code: 1, message: 'm', stack: 'x' } },
      { jsonrpc: '2.0', id: 1, error: { code: 1 } },
      { jsonrpc: '2.0', id: 1, error: { code: 1.5, message: 'm' } },
      { jsonrpc: '2.0', id: 1, error: { code: 1, message: 'm', data: { code: 'INTERNAL', message: 'm', more: 1 } } },
      { jsonrpc: '2.0', id: 1, error: { code: 1, message: 'm', data: 'x' } },
      { jsonrpc: '2.0', id: 1.5, result: null },
      { jsonrpc: '2.0', id: 'x'.repeat(129), result: null },
      { jsonrpc: '2.0', method: 'x'.repeat(129) },
      { jsonrpc: '2.0', method: '' },
      { jsonrpc: '2.0', method: 'output', params: 'x' },
      { jsonrpc: '2.0', method: 'output', params: null },
    ]) {
      expect(() => parseMessage(m), JSON.stringify(m)).toThrow(AegisError);
    }
  });

  it('accepts what our own peers send, and cuts a very long error message instead of refusing the answer', () => {
    const f = failure(3, new AegisError('NOT_FOUND', 'command not found: x'));
    expect(parseMessage(JSON.parse(JSON.stringify(f)))).toEqual(f);
    expect(parseMessage({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse' } })).toMatchObject({ id: null });
    const long = parseMessage({ jsonrpc: '2.0', id: 1, error: { code: 1, message: 'x'.repeat(100_000) } });
    expect('error' in long && long.error.message.length).toBeLessThan(70_000);
  });
});

describe('error codes across the wire', () => {
  it('carry the string code unchanged through a JSON-RPC failure', () => {
    const f = failure(7, new AegisError('NOT_FOUND', 'command not found: x'));
    const back = errorFromFailure(JSON.parse(JSON.stringify(f)).error);
    expect(back.code).toBe('NOT_FOUND');
    expect(back.message).toBe('command not found: x');
  });

  it('map an unknown code from a peer to UNKNOWN instead of crashing', () => {
    expect(AegisError.fromWire({ code: 'WHATEVER', message: 'm' }).code).toBe('UNKNOWN');
    expect(errorFromFailure({ code: 12345, message: 'm' }).code).toBe('UNKNOWN');
  });
});

describe('RpcPeer', () => {
  function pair(): { a: RpcPeer; b: RpcPeer } {
    const a: RpcPeer = new RpcPeer({ send: (l) => queueMicrotask(() => b.receive(Buffer.from(l))) });
    const b: RpcPeer = new RpcPeer({
      send: (l) => queueMicrotask(() => a.receive(Buffer.from(l))),
      onRequest: (method, params) => {
        if (method === 'echo') return Promise.resolve(params);
        return Promise.reject(new AegisError('FAILED_PRECONDITION', 'nope'));
      },
    });
    return { a, b };
  }

  it('matches responses to requests and carries error codes', async () => {
    const { a } = pair();
    await expect(a.request('echo', { x: 1 })).resolves.toEqual({ x: 1 });
    await expect(a.request('other')).rejects.toMatchObject({ code: 'FAILED_PRECONDITION', message: 'nope' });
  });

  it('times out a request that gets no answer', async () => {
    const silent = new RpcPeer({ send: () => undefined });
    await expect(silent.request('health', {}, { timeoutMs: 20 })).rejects.toMatchObject({ code: 'TIMEOUT' });
  });

  it('answers garbage with a parse error and keeps serving', async () => {
    const sent: string[] = [];
    const p = new RpcPeer({ send: (l) => sent.push(l), onRequest: () => Promise.resolve('ok') });
    p.receive(Buffer.from('not json\n{"jsonrpc":"2.0","id":1,"method":"x"}\n'));
    await new Promise((r) => setTimeout(r, 0));
    expect(JSON.parse(sent[0] ?? '{}')).toMatchObject({ id: null, error: { code: -32700 } });
    expect(JSON.parse(sent[1] ?? '{}')).toMatchObject({ id: 1, result: 'ok' });
  });

  it('answers a handler that throws synchronously with an error instead of dying', async () => {
    const sent: string[] = [];
    const p = new RpcPeer({
      send: (l) => sent.push(l),
      onRequest: () => {
        throw new AegisError('INVALID_ARGUMENT', 'bad params');
      },
    });
    p.receive(Buffer.from('{"jsonrpc":"2.0","id":3,"method":"x"}\n'));
    await new Promise((r) => setTimeout(r, 0));
    expect(JSON.parse(sent[0] ?? '{}')).toMatchObject({ id: 3, error: { data: { code: 'INVALID_ARGUMENT', message: 'bad params' } } });
  });

  it('fails pending requests when closed', async () => {
    const p = new RpcPeer({ send: () => undefined });
    const pending = p.request('health');
    p.close(new AegisError('UNAVAILABLE', 'gone'));
    await expect(pending).rejects.toMatchObject({ code: 'UNAVAILABLE' });
    await expect(p.request('health')).rejects.toMatchObject({ code: 'UNAVAILABLE' });
  });
});
