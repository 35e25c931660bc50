/**
 * The MCP server's stdio transport: newline-delimited JSON-RPC, as the SDK's own, but with
 * what an untrusted client needs. Framing is linear (each byte is scanned once; the SDK's
 * re-concatenates its buffer on every chunk), a line is bounded (an oversized one is skipped
 * to its end and answered `-32600`, not a silent exit), and a line that is not JSON (`-32700`)
 * or not a JSON-RPC message (`-32600`) gets an error reply; the server stays up after each.
 */
import type { Readable, Writable } from 'node:stream';
import type { Transport } from '@modelcontextprotocol/sdk/shared/transport.js';
import type { JSONRPCMessage } from '@modelcontextprotocol/sdk/types.js';

/**
 * Recognises a JSON-RPC message (the SDK's schema, handed in by `aegis mcp`: importing the SDK
 * here would load it, and zod, at every start of the CLI, a tenth of a second each).
 */
export type MessageCheck = (value: unknown) => { success: true; data: JSONRPCMessage } | { success: false };

/** Largest request line (a write_file of a large text included). */
export const MAX_MCP_LINE_BYTES = 8 * 1024 * 1024;

const PARSE_ERROR = -32700;
const INVALID_REQUEST = -32600;

export class BoundedStdioTransport implements Transport {
  onmessage?: (message: JSONRPCMessage) => void;
  onerror?: (error: Error) => void;
  onclose?: () => void;
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** Inside a line already refused for its size: dropped up to its newline. */
  private skipping = false;
  private closed = false;

  constructor(
    private readonly check: MessageCheck,
    private readonly input: Readable = process.stdin,
    private readonly output: Writable = process.stdout,
    private readonly maxLineBytes = MAX_MCP_LINE_BYTES,
  ) {}

  start(): Promise<void> {
    this.input.on('data', this.onData);
    this.input.on('end', this.onEnd);
    this.input.on('error', this.onInputError);
    return Promise.resolve();
  }

  private readonly onData = (chunk: Buffer): void => {
    let from = 0;
    for (let nl = chunk.indexOf(0x0a); nl >= 0; nl = chunk.indexOf(0x0a, from)) {
      this.take(chunk.subarray(from, nl));
      this.endLine();
      from = nl + 1;
    }
    if (from < chunk.length) this.take(chunk.subarray(from));
  };

  private take(part: Buffer): void {
    if (this.skipping || part.length === 0) return;
    if (this.pendingBytes + part.length > this.maxLineBytes) {
      this.pending = [];
      this.pendingBytes = 0;
      this.skipping = true;
      this.refuse(null, INVALID_REQUEST, `message over ${this.maxLineBytes} bytes refused`);
      return;
    }
    this.pending.push(part);
    this.pendingBytes += part.length;
  }

  private endLine(): void {
    const line = this.pending.length === 1 ? this.pending[0] : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    if (this.skipping) {
      this.skipping = false;
      return;
    }
    const text = line?.toString('utf8').trim() ?? '';
    if (text === '') return;
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch {
      this.refuse(null, PARSE_ERROR, 'parse error: the line is not JSON');
      return;
    }
    const parsed = this.check(value);
    if (!parsed.success) {
      const id = (value as { id?: unknown } | null)?.id;
      this.refuse(
        typeof id === 'string' || typeof id === 'number' ? id : null,
        INVALID_REQUEST,
        'invalid request: not a JSON-RPC 2.0 message',
      );
      return;
    }
    this.onmessage?.(parsed.data);
  }

  private refuse(id: string | number | null, code: number, message: string): void {
    process.stderr.write(`aegis mcp: ${message}\n`);
    void this.write(`${JSON.stringify({ jsonrpc: '2.0', id, error: { code, message } })}\n`);
  }

  private readonly onEnd = (): void => {
    process.stderr.write('aegis mcp: stdin closed; exiting\n');
    void this.close();
  };

  private readonly onInputError = (err: Error): void => {
    process.stderr.write(`aegis mcp: stdin: ${err.message}\n`);
    this.onerror?.(err);
  };

  send(message: JSONRPCMessage): Promise<void> {
    return this.write(`${JSON.stringify(message)}\n`);
  }

  private write(line: string): Promise<void> {
    if (this.closed) return Promise.resolve();
    return new Promise((resolve) => {
      if (this.output.write(line)) resolve();
      else this.output.once('drain', resolve);
    });
  }

  close(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.closed = true;
    this.input.off('data', this.onData);
    this.input.off('end', this.onEnd);
    this.input.off('error', this.onInputError);
    this.input.pause();
    this.onclose?.();
    return Promise.resolve();
  }
}
