/**
 * A streaming `multipart/form-data` reader for envd's `POST /files`: each part's bytes flow to
 * the guest as they arrive, never held whole (a 1 GiB upload costs the daemon a few chunks).
 * Parts come one at a time; the caller must read a part's `data` to its end (or destroy it)
 * before asking for the next.
 */
import { PassThrough, type Readable } from 'node:stream';
import { AegisError } from '@aegis/protocol';

export interface Part {
  /** The part's filename (the SDK puts the guest path there), or undefined for a plain field. */
  filename: string | undefined;
  data: Readable;
}

/** The boundary of a multipart content type. */
export function boundaryOf(contentType: string): string {
  const m = /;\s*boundary=(?:"([^"]+)"|([^;\s]+))/i.exec(contentType);
  const b = m?.[1] ?? m?.[2];
  if (!b || b.length > 200) throw new AegisError('INVALID_ARGUMENT', 'multipart/form-data without a boundary');
  return b;
}

/** The filename of a part's Content-Disposition, with the %22 / %0A / %0D escapes of FormData undone. */
function filenameOf(headers: string): string | undefined {
  const line = headers.split('\r\n').find((l) => /^content-disposition:/i.test(l));
  const m = line ? /;\s*filename="((?:[^"\\]|\\.)*)"/i.exec(line) : null;
  if (!m) return undefined;
  return (m[1] ?? '').replace(/%22/g, '"').replace(/%0A/gi, '\n').replace(/%0D/gi, '\r');
}

const MAX_HEADERS = 16 * 1024;

export async function* multipartParts(body: AsyncIterable<Buffer | Uint8Array | string>, boundary: string): AsyncGenerator<Part> {
  const it = body[Symbol.asyncIterator]();
  let buf: Buffer = Buffer.alloc(0);
  let eof = false;
  const fill = async (): Promise<boolean> => {
    if (eof) return false;
    const r = await it.next();
    if (r.done) {
      eof = true;
      return false;
    }
    const chunk = typeof r.value === 'string' ? Buffer.from(r.value) : Buffer.from(r.value.buffer, r.value.byteOffset, r.value.byteLength);
    buf = buf.length === 0 ? chunk : Buffer.concat([buf, chunk]);
    return true;
  };
  const bad = (why: string): AegisError => new AegisError('INVALID_ARGUMENT', `the multipart body is malformed: ${why}`);
  const dash = Buffer.from(`--${boundary}`);
  const delimiter = Buffer.from(`\r\n--${boundary}`);

  // Preamble, then the first boundary.
  for (;;) {
    const at = buf.indexOf(dash);
    if (at >= 0) {
      buf = buf.subarray(at + dash.length);
      break;
    }
    if (buf.length > dash.length) buf = buf.subarray(buf.length - dash.length);
    if (!(await fill())) throw bad('no boundary');
  }
  for (;;) {
    // After a boundary: "--" ends the body, "\r\n" starts a part.
    while (buf.length < 2) if (!(await fill())) throw bad('cut after a boundary');
    if (buf.subarray(0, 2).toString('latin1') === '--') return;
    if (buf.subarray(0, 2).toString('latin1') !== '\r\n') throw bad('no line break after a boundary');
    buf = buf.subarray(2);
    let end: number;
    while ((end = buf.indexOf('\r\n\r\n')) < 0) {
      if (buf.length > MAX_HEADERS) throw bad('part headers too long');
      if (!(await fill())) throw bad('cut in part headers');
    }
    const headers = buf.subarray(0, end).toString('utf8');
    buf = buf.subarray(end + 4);
    const data = new PassThrough();
    // Moves the part's bytes into `data` as they arrive, holding back what could start the delimiter.
    const pump = async (): Promise<void> => {
      const write = async (chunk: Buffer): Promise<void> => {
        if (chunk.length === 0 || data.destroyed) return;
        if (!data.write(chunk)) await new Promise<void>((resolve) => (data.once('drain', resolve), data.once('close', resolve)));
      };
      for (;;) {
        const at = buf.indexOf(delimiter);
        if (at >= 0) {
          await write(buf.subarray(0, at));
          buf = buf.subarray(at + delimiter.length);
          data.end();
          return;
        }
        const keep = delimiter.length - 1;
        if (buf.length > keep) {
          await write(buf.subarray(0, buf.length - keep));
          buf = buf.subarray(buf.length - keep);
        }
        if (!(await fill())) {
          const err = bad('cut inside a part');
          data.destroy(err);
          throw err;
        }
      }
    };
    const pumped = pump();
    pumped.catch(() => undefined);
    yield { filename: filenameOf(headers), data };
    await pumped;
  }
}
