/** The registry: built-in order, in-process registration, and modules named by AEGIS_BACKEND_MODULES. */
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BACKEND_MODULES_ENV, backendEntries, createBackends, registerBackend } from './index.js';

const dir = mkdtempSync(path.join(os.tmpdir(), 'aegis-backends-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

const stub = (name: string): string => `{ name: '${name}', create: () => ({ name: '${name}' }) }`;

describe('backend registry', () => {
  it('lists QEMU first, then Firecracker, with nothing else configured', async () => {
    expect((await backendEntries({})).map((e) => e.name)).toEqual(['qemu', 'firecracker']);
  });

  it('adds a backend from a module named in AEGIS_BACKEND_MODULES, after the built-in ones, without touching their users', async () => {
    const file = path.join(dir, 'extra.mjs');
    writeFileSync(file, `export const backends = [${stub('extra')}];\n`);
    const env = { [BACKEND_MODULES_ENV]: file };
    expect((await backendEntries(env)).map((e) => e.name)).toEqual(['qemu', 'firecracker', 'extra']);
    expect((await createBackends({}, env)).map((b) => b.name)).toEqual(['qemu', 'firecracker', 'extra']);
  });

  it('refuses a module that cannot be loaded or exports no backends, with INVALID_ARGUMENT naming it', async () => {
    const file = path.join(dir, 'empty.mjs');
    writeFileSync(file, 'export const nothing = 1;\n');
    await expect(backendEntries({ [BACKEND_MODULES_ENV]: file })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(backendEntries({ [BACKEND_MODULES_ENV]: path.join(dir, 'missing.mjs') })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringContaining('missing.mjs'),
    });
  });

  it('registers a backend in-process; registering a name again replaces it', async () => {
    registerBackend({ name: 'inproc', create: () => ({ name: 'inproc-1' }) as never });
    registerBackend({ name: 'inproc', create: () => ({ name: 'inproc-2' }) as never });
    const entries = await backendEntries({});
    expect(entries.map((e) => e.name)).toEqual(['qemu', 'firecracker', 'inproc']);
    expect(entries[2]?.create({}).name).toBe('inproc-2');
  });
});
