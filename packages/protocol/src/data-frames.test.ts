import { describe, expect, it } from 'vitest';
import { encodeFrame, frameHeader, FrameDecoder, FrameType, HEADER_BYTES, MAX_PAYLOAD } from './data-frames.js';

describe('data channel frames', () => {
  it('round-trips frames split at every byte boundary', () => {
    const wire = Buffer.concat([
      encodeFrame(7, FrameType.OPEN, Buffer.from([0x1f, 0x90])),
      encodeFrame(7, FrameType.DATA, Buffer.from('hello')),
      encodeFrame(0xffffffff, FrameType.FIN),
    ]);
    for (let cut = 0; cut <= wire.length; cut++) {
      const d = new FrameDecoder();
      const frames = [...d.push(wire.subarray(0, cut)), ...d.push(wire.subarray(cut))];
      expect(frames.map((f) => [f.connId, f.type, f.payload.toString('hex')])).toEqual([
        [7, FrameType.OPEN, '1f90'],
        [7, FrameType.DATA, Buffer.from('hello').toString('hex')],
        [0xffffffff, FrameType.FIN, ''],
      ]);
    }
  });

  it('refuses a payload over the limit, on both ends', () => {
    expect(() => encodeFrame(1, FrameType.DATA, Buffer.alloc(MAX_PAYLOAD + 1))).toThrow(RangeError);
    const header = Buffer.alloc(HEADER_BYTES);
    header.writeUInt32BE(MAX_PAYLOAD + 1, 5);
    expect(() => new FrameDecoder().push(header)).toThrow(/corrupt/);
  });

  it("a declared length above its type's limit is refused as soon as the header arrives, before any payload is buffered", () => {
    const limit = (type: number): number => (type === FrameType.ACK ? 4 : type === FrameType.DATA ? MAX_PAYLOAD : -1);
    const d = new FrameDecoder(limit);
    expect(d.push(encodeFrame(1, FrameType.ACK, Buffer.alloc(4))).map((f) => f.type)).toEqual([FrameType.ACK]);
    expect(d.buffered).toBe(0);
    expect(() => d.push(frameHeader(1, FrameType.ACK, 5))).toThrow(/type 4 with 5 bytes \(at most 4\)/);
    expect(() => new FrameDecoder(limit).push(frameHeader(1, FrameType.OPEN, 2))).toThrow(/type 1: stream corrupt/);
    const partial = new FrameDecoder(limit);
    partial.push(frameHeader(1, FrameType.DATA, 100));
    partial.push(Buffer.alloc(40));
    expect(partial.buffered).toBe(HEADER_BYTES + 40);
  });
});
