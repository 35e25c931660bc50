/**
 * The MCP server's transport with hostile input, no daemon: split and joined lines, an
 * oversized line, a line that is not JSON and one that is not JSON-RPC each get an error reply
 * and the next message still arrives; a large message arrives whole.
 */
import { PassThrough } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { JSONRPCMessageSchema, type JSONRPCMessage } from '@modelcontextprotocol/sdk/types.js';
import { BoundedStdioTransport } from './mcp-transport.js';

function harness(maxLineBytes?: number): { input: PassThrough; replies: () => unknown[]; got: JSONRPCMessage[] } {
  const input = new PassThrough();
  const output = new PassThrough();
  const got: JSONRPCMessage[] = [];
  let text = '';
  output.on('data', (c: Buffer) => (text += c.toString()));
  const t = new BoundedStdioTransport((v) => JSONRPCMessageSchema.safeParse(v), input, output, maxLineBytes);
  t.onmessage = (m) => void got.push(m);
  void t.start();
  return {
    input,
    got,
    replies: () =>
      text
        .split('\n')
        .filter((l) => l)
        .map((l) => JSON.parse(l) as unknown),
  };
}

const ping = (id: number): string => JSON.stringify({ jsonrpc: '2.0', id, method: 'ping' });
const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('the MCP stdio transport', () => {
  it('frames lines split across chunks and several in one chunk', async () => {
    const h = harness();
    const two = `${ping(1)}\n${ping(2)}\n`;
    h.input.write(two.slice(0, 10));
    h.input.write(two.slice(10, 40));
    h.input.write(two.slice(40));
    await tick();
    expect(h.got.map((m) => (m as { id: number }).id)).toEqual([1, 2]);
  });

  it('answers an oversized line -32600, skips to its end, and takes the next message', async () => {
    const h = harness(1024);
    h.input.write(`{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"x":"${'a'.repeat(600)}`);
    h.input.write(`${'a'.repeat(600)}"}}\n${ping(8)}\n`);
    await tick();
    expect(h.replies()).toEqual([{ jsonrpc: '2.0', id: null, error: { code: -32600, message: 'message over 1024 bytes refused' } }]);
    expect(h.got.map((m) => (m as { id: number }).id)).toEqual([8]);
  });

  it('answers a line that is not JSON -32700, and one that is not JSON-RPC -32600 with its id', async () => {
    const h = harness();
    h.input.write(`{not json\n{"id":3,"hello":1}\n${ping(4)}\n`);
    await tick();
    expect(h.replies()).toEqual([
      { jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse error: the line is not JSON' } },
      { jsonrpc: '2.0', id: 3, error: { code: -32600, message: 'invalid request: not a JSON-RPC 2.0 message' } },
    ]);
    expect(h.got.map((m) => (m as { id: number }).id)).toEqual([4]);
  });

  it('takes an 8 MB message arriving in many small chunks', async () => {
    const h = harness(16 * 1024 * 1024);
    const line = `{"jsonrpc":"2.0","id":9,"method":"x","params":{"s":"${'b'.repeat(8_000_000)}"}}\n`;
    for (let i = 0; i < line.length; i += 16 * 1024) h.input.write(line.slice(i, i + 16 * 1024));
    await tick();
    expect(h.got).toHaveLength(1);
    expect(JSON.stringify(h.got[0]).length).toBe(line.length - 1);
  });
});
