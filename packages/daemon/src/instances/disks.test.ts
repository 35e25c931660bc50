/** Which file is an instance's kept disk, and whether the backend made it (a restart boots on it). */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { existingDisk } from './spec.js';

let dir: string;
beforeEach(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-disks-'));
});
afterEach(() => rmSync(dir, { recursive: true, force: true }));

describe('existingDisk', () => {
  it('finds none in a new directory', async () => {
    expect(await existingDisk(dir)).toBeUndefined();
  });

  it('finds a raw disk of its own, and a clone the backend made', async () => {
    writeFileSync(path.join(dir, 'scratch.img'), '');
    expect(await existingDisk(dir)).toEqual({ path: path.join(dir, 'scratch.img'), cloned: false });
    writeFileSync(path.join(dir, 'scratch.clone'), '');
    expect(await existingDisk(dir)).toEqual({ path: path.join(dir, 'scratch.clone'), cloned: true });
  });

  it('keeps booting a clone made before clones were called scratch.clone, by its old name', async () => {
    writeFileSync(path.join(dir, 'scratch.cow'), '');
    writeFileSync(path.join(dir, 'scratch.img.tmp'), '');
    expect(await existingDisk(dir)).toEqual({ path: path.join(dir, 'scratch.cow'), cloned: true });
  });
});
