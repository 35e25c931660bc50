import { Readable } from 'node:stream';
import { describe, expect, it } from 'vitest';
import { boundaryOf, multipartParts } from './multipart.js';

/** A FormData as the SDK's fetch sends it, cut into chunks of `size` bytes. */
async function encode(fd: FormData, size: number): Promise<{ type: string; chunks: Buffer[] }> {
  const r = new Response(fd);
  const type = r.headers.get('content-type') ?? '';
  const all = Buffer.from(await r.arrayBuffer());
  const chunks: Buffer[] = [];
  for (let at = 0; at < all.length; at += size) chunks.push(all.subarray(at, at + size));
  return { type, chunks };
}

async function read(fd: FormData, size: number): Promise<Array<{ filename: string | undefined; text: string }>> {
  const { type, chunks } = await encode(fd, size);
  const out: Array<{ filename: string | undefined; text: string }> = [];
  for await (const part of multipartParts(Readable.from(chunks), boundaryOf(type))) {
    const got: Buffer[] = [];
    for await (const c of part.data) got.push(c as Buffer);
    out.push({ filename: part.filename, text: Buffer.concat(got).toString('utf8') });
  }
  return out;
}

describe('multipart uploads read as streams', () => {
  it('gives each part its filename (a path) and its bytes, whatever the chunking', async () => {
    for (const size of [1, 3, 17, 1000, 1 << 20]) {
      const fd = new FormData();
      fd.append('file', new Blob(['first\r\n--not a boundary']), '/tmp/a b/"q".txt');
      fd.append('file', new Blob(['']), 'empty.txt');
      fd.append('file', new Blob(['x'.repeat(5000)]), '/root/big.txt');
      expect(await read(fd, size), `chunks of ${size}`).toEqual([
        { filename: '/tmp/a b/"q".txt', text: 'first\r\n--not a boundary' },
        { filename: 'empty.txt', text: '' },
        { filename: '/root/big.txt', text: 'x'.repeat(5000) },
      ]);
    }
  });

  it('a plain field has no filename: its value is the content', async () => {
    const fd = new FormData();
    fd.append('file', 'file content');
    expect(await read(fd, 7)).toEqual([{ filename: undefined, text: 'file content' }]);
  });

  it('a body cut short, or without a boundary, is INVALID_ARGUMENT', async () => {
    const fd = new FormData();
    fd.append('file', new Blob(['abc']), 'f');
    const { type, chunks } = await encode(fd, 1 << 20);
    const cut = [Buffer.concat(chunks).subarray(0, 60)];
    const drain = async (body: Buffer[], t: string): Promise<void> => {
      for await (const p of multipartParts(Readable.from(body), boundaryOf(t))) for await (const _ of p.data) void _;
    };
    await expect(drain(cut, type)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect(() => boundaryOf('multipart/form-data')).toThrow();
  });
});
