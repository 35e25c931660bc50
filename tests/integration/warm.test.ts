/**
 * Warm boot: instances restored from a snapshot template must each be their own machine
 * (randomness, clock, name), and a template that cannot be restored must not break anything.
 */
import { chmodSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { useDaemon } from './fixture.js';

// Templates of its own: the fallback test spoils them on purpose.
const templates = mkdtempSync('/tmp/aegis-templates-');
// Before the daemon's hook: after-hooks run in reverse, so the directory goes once the daemon
// has stopped writing templates into it.
afterAll(() => rmSync(templates, { recursive: true, force: true }));
const daemon = useDaemon({ AEGIS_TEMPLATES: templates });

async function untilWarm(d: ReturnType<typeof daemon>): Promise<void> {
  // The daemon builds the template in the background after it starts.
  for (let i = 0; i < 600; i++) {
    if (/template \w+: ready|warm boot/.test(d.log())) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`no template was built:\n${d.log()}`);
}

describe('warm boot from a snapshot template', () => {
  it('gives every restored instance its own random numbers, the current time and its own name', async () => {
    const d = daemon();
    await d.cli(['run', '--', 'true']); // ensures a template is on its way
    await untilWarm(d);
    const probe = ['sh', '-c', 'uname -n; date +%s; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo'];
    const a = await d.cli(['run', '--name', 'clone-a', '--', ...probe]);
    const b = await d.cli(['run', '--name', 'clone-b', '--', ...probe]);
    expect(d.log()).toMatch(/clone-a \(\w+\): warm boot/);
    expect(d.log()).toMatch(/clone-b \(\w+\): warm boot/);
    const [nameA, timeA, randA] = a.stdout.trim().split('\n');
    const [nameB, timeB, randB] = b.stdout.trim().split('\n');
    expect([nameA, nameB]).toEqual(['clone-a', 'clone-b']);
    expect(randA).toMatch(/^[0-9a-f]{32}$/);
    expect(randA).not.toBe(randB);
    const now = Date.now() / 1000;
    for (const t of [timeA, timeB]) expect(Math.abs(Number(t) - now)).toBeLessThan(30);
  });

  it('falls back to a cold boot when the template cannot be restored, and sets it aside', async () => {
    const d = daemon();
    await untilWarm(d);
    // Each build's own immutable directory, `<key>.<build>`: spoiled here on purpose.
    const ready = readdirSync(templates).filter((n) => /^[0-9a-f]{20}\.b[0-9a-f]{16}$/.test(n));
    expect(ready.length).toBeGreaterThan(0);
    for (const t of ready) {
      const snapshot = path.join(templates, t, 'snapshot.bin');
      chmodSync(snapshot, 0o600);
      writeFileSync(snapshot, 'not a snapshot');
    }
    const r = await d.cli(['run', '--name', 'fallback', '--', 'echo', 'still works']);
    expect(r.stdout).toBe('still works\n');
    expect(r.code).toBe(0);
    expect(d.log()).toMatch(/fallback \(\w+\): warm boot failed .*; booting cold/);
    expect(d.log()).toMatch(/discarded after a failed restore/);
  });

  it('a template rebuilt under stopped instances leaves their disks intact: restart finds each one its files', async () => {
    const d = daemon();
    // The previous test set the template aside: wait for its replacement to be current.
    await d.cli(['run', '--', 'true']);
    for (let i = 0; i < 600 && !readdirSync(templates).some((n) => n.endsWith('.current')); i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const handles = ['keep-a', 'keep-b'];
    for (const h of handles) {
      await d.client.createInstance({ handle: h, command: ['sh', '-c', `echo ${h} > /mark; sync; exec sleep 600`] });
      expect(d.log()).toMatch(new RegExp(`${h} \\(\\w+\\): warm boot`));
      for (let i = 0; i < 50 && (await d.cli(['exec', h, '--', 'cat', '/mark'])).stdout !== `${h}\n`; i++) {
        await new Promise((r) => setTimeout(r, 100));
      }
      await d.client.stopInstance(h);
    }
    // The current build is set aside (as after a failed restore) and a new one is built in its
    // place, while both stopped instances' disks are copy-on-write children of the old one.
    const builtBefore = (d.log().match(/template \w+: ready in/g) ?? []).length;
    for (const n of readdirSync(templates).filter((n) => n.endsWith('.current'))) rmSync(path.join(templates, n));
    await d.cli(['run', '--', 'true']);
    for (let i = 0; i < 600 && (d.log().match(/template \w+: ready in/g) ?? []).length === builtBefore; i++) {
      await new Promise((r) => setTimeout(r, 100));
    }
    expect((d.log().match(/template \w+: ready in/g) ?? []).length).toBe(builtBefore + 1);
    for (const h of handles) {
      await d.client.restartInstance(h);
      const r = await d.cli(['exec', h, '--', 'cat', '/mark']);
      expect(r.stdout).toBe(`${h}\n`);
      const fsck = await d.cli(['exec', h, '--', 'sh', '-c', 'dmesg | grep -ci "ext4.*error" || true']);
      expect(fsck.stdout.trim()).toBe('0');
    }
  });
});
