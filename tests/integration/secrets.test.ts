/** Secrets: encrypted at rest, injected on request, and never found anywhere in plaintext. */
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, openSync, readSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { qemuProcessesFor, useDaemon } from './fixture.js';

const daemon = useDaemon();

/** Every file under `dir` whose bytes contain `needle` (read in chunks; handles big sparse disks). */
function filesContaining(dir: string, needles: Buffer[]): string[] {
  const hits: string[] = [];
  const overlap = Math.max(...needles.map((n) => n.length));
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = path.join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.isFile() && statSync(p).size > 0) {
        const fd = openSync(p, 'r');
        try {
          const buf = Buffer.alloc(8 << 20);
          let carry = Buffer.alloc(0);
          for (let pos = 0; ;) {
            const n = readSync(fd, buf, 0, buf.length, pos);
            if (n === 0) break;
            pos += n;
            const window = Buffer.concat([carry, buf.subarray(0, n)]);
            if (needles.some((nd) => window.includes(nd))) {
              hits.push(p);
              break;
            }
            carry = window.subarray(Math.max(0, window.length - overlap));
          }
        } finally {
          closeSync(fd);
        }
      }
    }
  };
  walk(dir);
  return hits;
}

describe('secrets', () => {
  it('reach the workload with --secret, and no file under AEGIS_HOME or the daemon log holds the value', async () => {
    const d = daemon();
    const value = `sekrit-${randomBytes(12).toString('hex')}`;
    const digest = createHash('sha256').update(value).digest('hex');
    const set = await d.cli(['secret', 'set', 'API_TOKEN', '-'], { input: `${value}\n` });
    expect(set.code).toBe(0);

    const list = await d.cli(['secret', 'list']);
    expect(list.stdout).toMatch(/^API_TOKEN\s+-\s+\d{4}-/m);
    expect(list.stdout).not.toContain(value);

    // The workload proves it has the value without printing it.
    const started = await d.cli([
      'instance',
      'start',
      '--name',
      'sec',
      '--secret',
      'API_TOKEN',
      '--',
      'sh',
      '-c',
      'printf %s "$API_TOKEN" | sha256sum; exec sleep 600',
    ]);
    expect(started.code).toBe(0);
    const exec = await d.cli(['exec', 'sec', '--', 'sh', '-c', 'echo exec ran; ls /tmp']);
    expect(exec.code).toBe(0);
    for (let i = 0; i < 50 && !(await d.cli(['logs', 'sec'])).stdout.includes(digest); i++) await new Promise((r) => setTimeout(r, 100));
    expect((await d.cli(['logs', 'sec'])).stdout).toBe(`${digest}  -\n`);
    const info = await d.cli(['instance', 'info', 'sec', '--json']);
    const listed = await d.cli(['instance', 'list', '--all', '--json']);
    expect((await d.cli(['instance', 'stop', 'sec'])).code).toBe(0);

    for (const out of [set, list, started, exec, info, listed]) {
      expect(out.stdout + out.stderr).not.toContain(value);
    }
    const needles = [Buffer.from(value), Buffer.from(Buffer.from(value).toString('base64').slice(0, 24))];
    // The search itself must be able to fail: a planted copy is found.
    const plant = path.join(d.home, 'plant');
    writeFileSync(plant, Buffer.concat([Buffer.alloc(9 << 20), Buffer.from(value)]));
    expect(filesContaining(d.home, needles)).toEqual([plant]);
    rmSync(plant);
    expect(filesContaining(d.home, needles)).toEqual([]);
    expect(d.log()).not.toContain(value);
    expect(statSync(path.join(d.home, 'secrets.key')).mode & 0o777).toBe(0o600);
    await d.client.deleteInstance('sec');
  });

  it("'*' injects every secret; an env/secret name clash is INVALID_ARGUMENT", async () => {
    const d = daemon();
    await d.client.setSecret('ONE', 'first');
    await d.client.setSecret('TWO', 'second');
    const r = await d.cli(['run', '--secret', '*', '--', 'sh', '-c', 'echo ${#ONE} ${#TWO}']);
    expect(r.stdout).toBe('5 6\n');
    const clash = await d.cli(['run', '-e', 'ONE=x', '--secret', 'ONE', '--', 'true']);
    expect(clash.stderr).toMatch(/ONE is given both as an environment variable and as a secret \[INVALID_ARGUMENT\]/);
    await d.client.deleteSecret('ONE');
    await d.client.deleteSecret('TWO');
  });

  it('an unknown secret fails before any VM boots, and deleting one that does not exist is NOT_FOUND', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--secret', 'NOPE', '--', 'true']);
    expect(r.code).toBe(125); // docker run's status for an error of its own
    expect(r.stderr).toBe('aegis: no secret named NOPE; set it with: aegis secret set NOPE - [NOT_FOUND]\n');
    expect(await qemuProcessesFor(d.home)).toEqual([]);
    expect(await d.client.listInstances({ all: true })).toEqual([]);
    expect((await d.cli(['secret', 'delete', 'NOPE'])).stderr).toMatch(/\[NOT_FOUND\]/);
    expect((await d.cli(['secret', 'set', 'bad-name', 'x'])).stderr).toMatch(/\[INVALID_ARGUMENT\]/);
  });
});
