/**
 * Import bombs for tests: tars of many empty files, written header by header (tar-stream's packer
 * takes over a minute for 200,000 entries; this takes about a second) and streamed, so a bomb of
 * a million entries costs the test no memory.
 */
import { createHash } from 'node:crypto';
import { createWriteStream, statSync } from 'node:fs';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip } from 'node:zlib';

const BLOCK = 512;

/** A ustar header: type '0' file, '5' directory. */
export function tarHeader(name: string, size: number, type: '0' | '5' = '0'): Buffer {
  const h = Buffer.alloc(BLOCK);
  if (Buffer.byteLength(name) > 100) throw new Error(`tar name too long for a plain ustar header: ${name}`);
  h.write(name, 0);
  h.write(type === '5' ? '0000755\0' : '0000644\0', 100);
  h.write('0000000\0', 108);
  h.write('0000000\0', 116);
  h.write(`${size.toString(8).padStart(11, '0')}\0`, 124);
  h.write('00000000000\0', 136);
  h.write('        ', 148);
  h.write(type, 156);
  h.write('ustar\0' + '00', 257);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
  return h;
}

/** The names of a bomb: `d<k>/` directories holding 1,000 files each. */
function* bombEntries(files: number): Generator<Buffer> {
  const perChunk = 1024;
  let chunk: Buffer[] = [];
  for (let i = 0; i < files; i++) {
    if (i % 1000 === 0) chunk.push(tarHeader(`d${i / 1000}/`, 0, '5'));
    chunk.push(tarHeader(`d${Math.floor(i / 1000)}/f${i}`, 0));
    if (chunk.length >= perChunk) {
      yield Buffer.concat(chunk);
      chunk = [];
    }
  }
  chunk.push(Buffer.alloc(2 * BLOCK));
  yield Buffer.concat(chunk);
}

/** Bytes of the layer tar `bombEntries(files)` makes. */
export function bombLayerBytes(files: number): number {
  return (files + Math.ceil(files / 1000)) * BLOCK + 2 * BLOCK;
}

/** A layer tar of `files` empty files (plain, as docker save stores layers). */
export function bombLayer(files: number): Readable {
  return Readable.from(bombEntries(files));
}

/**
 * A gzipped `docker save` archive of one image whose one layer holds `files` empty files:
 * ~2 MiB per 200,000. The layer comes first and the config naming its diff_id after it, so the
 * layer is hashed as it is written. Returns the archive's size in bytes.
 */
export async function writeDockerSaveBomb(file: string, files: number, name = 'bomb:latest'): Promise<number> {
  const layerHash = createHash('sha256');
  const layerBytes = bombLayerBytes(files);
  async function* archive(): AsyncGenerator<Buffer> {
    yield tarHeader('layer/layer.tar', layerBytes);
    for (const chunk of bombEntries(files)) {
      layerHash.update(chunk);
      yield chunk;
    }
    // layerBytes is a whole number of blocks: no padding after it.
    const config = Buffer.from(
      JSON.stringify({
        architecture: 'amd64',
        os: 'linux',
        config: { Cmd: ['/bin/true'] },
        rootfs: { type: 'layers', diff_ids: [`sha256:${layerHash.digest('hex')}`] },
      }),
    );
    const configName = `${createHash('sha256').update(config).digest('hex')}.json`;
    yield* entry(configName, config);
    yield* entry('manifest.json', Buffer.from(JSON.stringify([{ Config: configName, RepoTags: [name], Layers: ['layer/layer.tar'] }])));
    yield Buffer.alloc(2 * BLOCK);
  }
  function* entry(entryName: string, data: Buffer): Generator<Buffer> {
    yield tarHeader(entryName, data.length);
    yield data;
    const pad = (BLOCK - (data.length % BLOCK)) % BLOCK;
    if (pad > 0) yield Buffer.alloc(pad);
  }
  await pipeline(Readable.from(archive()), createGzip({ level: 1 }), createWriteStream(file));
  return statSync(file).size;
}
