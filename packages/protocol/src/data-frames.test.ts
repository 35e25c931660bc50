import { describe, expect, it } from 'vitest';
import { encodeFrame, FrameDecoder, FrameType, HEADER_BYTES, MAX_PAYLOAD } from './data-frames.js';

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
});
