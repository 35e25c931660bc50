import { describe, expect, it } from 'vitest';
import { parseEvent, parseParams } from './guest.js';

describe('guest contract parsers', () => {
  it('accept well-formed run params', () => {
    expect(parseParams.run({ command: ['echo', 'hi'], env: { A: 'b' } })).toEqual({ command: ['echo', 'hi'], env: { A: 'b' } });
  });

  it('reject an empty command, unknown fields and wrong types', () => {
    expect(() => parseParams.run({ command: [], env: {} })).toThrow(/non-empty/);
    expect(() => parseParams.run({ command: ['x'], env: {}, extra: 1 })).toThrow(/unknown field "extra"/);
    expect(() => parseParams.exec({ execId: 1, command: ['x'] })).toThrow(/execId/);
  });

  it('check notifications from the untrusted guest', () => {
    expect(parseEvent.output({ stream: 'stdout', data: 'aGk=' })).toEqual({ stream: 'stdout', data: 'aGk=' });
    expect(() => parseEvent.output({ stream: 'stdin', data: '' })).toThrow(/stream/);
    expect(() => parseEvent.exit({ exitCode: '3', signal: null })).toThrow(/exitCode/);
    expect(parseEvent.exit({ exitCode: null, signal: 'SIGKILL' })).toEqual({ exitCode: null, signal: 'SIGKILL' });
  });
});
