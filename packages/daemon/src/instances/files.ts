/**
 * The host side of the guest file service: one data-channel connection (port 0) per
 * operation, a request line, then raw bytes either way (contract: @aegis/protocol files.ts).
 * Everything the guest answers is parsed with the contract's bounds before use.
 */
import type { Duplex, Readable } from 'node:stream';
import {
  AegisError,
  isErrorCode,
  MAX_LIST_ENTRIES,
  parseFileReply,
  parseFileStat,
  parseJsonLine,
  readHeaderLine,
  type FileReply,
  type FileRequest,
  type FileStat,
} from '@aegis/protocol';

/** Opens a connection to the guest's file service (PortForwarder.open(0)). */
export type OpenFileConnection = () => Promise<Duplex>;

export interface FileResult {
  stat?: FileStat;
  /** What follows the reply line: a file's bytes, a tar, or list lines; ended by the guest. */
  data: Readable;
}

/**
 * Sends `req` (then `body`, if any, and end of file) and reads the reply line. A guest error
 * comes back as an AegisError with its code when it is one of ours (INTERNAL otherwise).
 */
export async function fileOp(open: OpenFileConnection, req: FileRequest, body?: Readable, signal?: AbortSignal): Promise<FileResult> {
  try {
    return await fileOpOnce(open, req, body, signal);
  } catch (err) {
    // Nothing answered the first line (the connection never opened, or closed at once): no
    // byte of the body was taken and nothing happened in the guest, so one more try is safe.
    if (!(err instanceof NoAnswer) || signal?.aborted) throw err;
    return fileOpOnce(open, req, body, signal);
  }
}

/** The guest's file service said nothing before the connection ended. */
class NoAnswer extends AegisError {
  constructor() {
    super('UNAVAILABLE', 'the guest file service did not answer (the VM stopped, or its agent is not running)');
  }
}

async function fileOpOnce(open: OpenFileConnection, req: FileRequest, body?: Readable, signal?: AbortSignal): Promise<FileResult> {
  const conn = await open();
  const onAbort = (): void => void conn.destroy();
  signal?.addEventListener('abort', onAbort, { once: true });
  conn.once('close', () => signal?.removeEventListener('abort', onAbort));
  conn.on('error', () => undefined); // surfaces as a short stream or a missing reply
  conn.write(JSON.stringify(req) + '\n');
  if (!body) conn.end();
  let reply = await replyLine(conn, signal);
  if (body && reply.ok && reply.ready) {
    // The guest is ready for the bytes; its answer comes once it has them all.
    body.on('error', (err) => conn.destroy(err));
    body.pipe(conn);
    reply = await replyLine(conn, signal).catch((err: unknown) => {
      // Too late to try again: the body is spent.
      throw err instanceof NoAnswer ? new AegisError('UNAVAILABLE', err.message) : err;
    });
  }
  if (!reply.ok) {
    conn.destroy();
    throw new AegisError(isErrorCode(reply.code) ? reply.code : 'INTERNAL', reply.message);
  }
  return { ...(reply.stat ? { stat: reply.stat } : {}), data: conn };
}

async function replyLine(conn: Duplex, signal: AbortSignal | undefined): Promise<FileReply> {
  try {
    return parseFileReply(parseJsonLine(await readHeaderLine(conn)));
  } catch (err) {
    conn.destroy();
    if (signal?.aborted) throw new AegisError('CANCELLED', 'the caller went away');
    throw AegisError.from(err).code === 'UNAVAILABLE'
      ? new NoAnswer()
      : new AegisError('INTERNAL', `the guest file service sent a bad reply: ${(err as Error).message}`);
  }
}

/** Reads a `list` reply's entry lines, each checked; at most MAX_LIST_ENTRIES. */
export async function readEntries(data: Readable): Promise<FileStat[]> {
  const entries: FileStat[] = [];
  let buf = '';
  for await (const chunk of data as AsyncIterable<Buffer>) {
    buf += chunk.toString('utf8');
    let nl: number;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (entries.length >= MAX_LIST_ENTRIES) throw new AegisError('INTERNAL', 'the guest listed more entries than it may');
      entries.push(parseFileStat(parseJsonLine(line)));
    }
    if (buf.length > 64 * 1024) throw new AegisError('INTERNAL', 'the guest sent a list line that is too long');
  }
  return entries;
}
