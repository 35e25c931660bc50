import { mkdtempSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkHostAndOrigin, ensureSecretFile, parseLoopbackAddr } from './loopback.js';

const ours = { host: '127.0.0.1', port: 7777 };
const dashboard = { subdomains: false, exactOrigin: true };
const denied = expect.objectContaining({ code: 'PERMISSION_DENIED' }) as Error;

describe('the dashboard’s Host and Origin rules', () => {
  it('pass its own pages: loopback Host at our port, Origin absent or exactly ours', () => {
    for (const [host, origin] of [
      ['127.0.0.1:7777', undefined],
      ['localhost:7777', 'http://localhost:7777'],
      ['127.0.0.1:7777', 'http://127.0.0.1:7777'],
    ] as const) {
      expect(() => checkHostAndOrigin(host, origin, ours, dashboard), `${host} ${origin}`).not.toThrow();
    }
  });

  it('refuse other loopback servers’ pages, https, other ports, .localhost names and foreign hosts with PERMISSION_DENIED', () => {
    for (const [host, origin] of [
      ['127.0.0.1:7777', 'http://127.0.0.1'],
      ['127.0.0.1:7777', 'http://127.0.0.1:8080'],
      ['127.0.0.1:7777', 'https://127.0.0.1:7777'],
      ['127.0.0.1:7777', 'http://evil.example:7777'],
      ['127.0.0.1:7777', 'null'],
      ['x.localhost:7777', undefined],
      ['evil.example:7777', undefined],
      ['127.0.0.1:7778', undefined],
      [undefined, undefined],
    ] as const) {
      expect(() => checkHostAndOrigin(host, origin, ours, dashboard), `${host} ${origin}`).toThrow(denied);
    }
  });

  it('the E2B rules are unchanged: an Origin without a port and .localhost names pass', () => {
    expect(() => checkHostAndOrigin('3000-abc.localhost:7777', 'http://localhost', ours)).not.toThrow();
  });
});

describe('loopback addresses and secret files', () => {
  it('an address off loopback is refused with INVALID_ARGUMENT naming the door', () => {
    expect(() => parseLoopbackAddr('0.0.0.0:7777', 'dashboard')).toThrow(/dashboard listens on loopback only/);
    expect(parseLoopbackAddr('localhost:0', 'dashboard')).toEqual({ host: '127.0.0.1', port: 0 });
  });

  it('a secret file is made 0600 once and then kept; one of the wrong form is replaced', async () => {
    const home = mkdtempSync(path.join(os.tmpdir(), 'aegis-loopback-'));
    let n = 0;
    const make = (): string => `${'a'.repeat(63)}${n++}`;
    const first = await ensureSecretFile(home, 'ui.token', /^a{63}\d$/, make);
    expect(statSync(path.join(home, 'ui.token')).mode & 0o777).toBe(0o600);
    expect(await ensureSecretFile(home, 'ui.token', /^a{63}\d$/, make)).toBe(first);
    expect(await ensureSecretFile(home, 'ui.token', /^b+$/, () => 'bbbb')).toBe('bbbb');
  });
});
