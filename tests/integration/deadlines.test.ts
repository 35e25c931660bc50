/**
 * Deadlines (`--timeout`, the SDK's `timeoutMs`): an instance is stopped at its deadline
 * whoever is still around — a killed SDK host program leaks nothing — the deadline can be
 * moved, and it survives an aegisd restart.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, useDaemon } from './fixture.js';

const daemon = useDaemon();

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('deadlines', () => {
  it('a SIGKILLed SDK host program leaves no sandbox past its deadline', async () => {
    const d = daemon();
    const script = `
import { Sandbox } from ${JSON.stringify(path.join(ROOT, 'packages/sdk/dist/sdk.mjs'))};
const sbx = await Sandbox.create({ timeoutMs: 4000, network: 'none' });
console.log(JSON.stringify({ id: sbx.id, deadline: sbx.deadline.getTime() }));
setInterval(() => {}, 1000); // and then it is killed, with no chance to clean up
`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { env: d.env, stdio: ['ignore', 'pipe', 'inherit'] });
    const line = await new Promise<string>((resolve) => child.stdout.once('data', (b: Buffer) => resolve(b.toString())));
    const { id, deadline } = JSON.parse(line) as { id: string; deadline: number };
    child.kill('SIGKILL');
    expect((await d.client.getInstance(id)).state).toBe('running');
    await sleep(Math.max(0, deadline - Date.now() - 500));
    expect((await d.client.getInstance(id)).state).toBe('running'); // not before its time
    let goneAt = 0;
    for (let i = 0; i < 100; i++) {
      const list = await d.client.listInstances({ all: true });
      if (!list.some((x) => x.id === id)) {
        goneAt = Date.now();
        break;
      }
      await sleep(100);
    }
    expect(goneAt).toBeGreaterThan(0);
    // Stopped (SIGTERM, then the VM) and deleted within a couple of seconds of the deadline.
    expect(goneAt - deadline).toBeLessThan(2500);
  });

  it('--timeout shows in info, instance extend moves it, and the stop says why', async () => {
    const d = daemon();
    const started = Date.now();
    expect((await d.cli(['run', '-d', '--timeout', '3s', '--name', 'short', '--network', 'none', '--', 'sleep', '600'])).code).toBe(0);
    const info = await d.cli(['instance', 'info', 'short']);
    expect(info.stdout).toMatch(/^Deadline: +\d{4}-\d\d-\d\dT/m);
    const extended = await d.cli(['instance', 'extend', 'short', '6s']);
    expect(extended.stdout).toMatch(/^short until \d{4}-/);
    await sleep(4000 - (Date.now() - started));
    expect((await d.client.getInstance('short')).state).toBe('running'); // the old deadline passed
    for (let i = 0; i < 80 && (await d.client.getInstance('short')).state !== 'stopped'; i++) await sleep(100);
    const end = await d.client.getInstance('short');
    expect(end.state).toBe('stopped');
    expect(end.stateReason).toMatch(/^deadline reached/);
    expect(end.deadline).toBeUndefined();
    expect((await d.cli(['instance', 'extend', 'short', '1m'])).stderr).toMatch(/it is stopped.*\[FAILED_PRECONDITION\]/);
    expect((await d.cli(['run', '--timeout', 'soon', '--', 'true'])).stderr).toMatch(/--timeout.*"soon" is not a duration/);
  });

  it('survives an aegisd restart: the new daemon stops it at the same time', async () => {
    const d = daemon();
    const inst = await d.client.createInstance({ handle: 'kept', command: ['sleep', '600'], network: 'none', timeoutMs: 7000 });
    const deadline = Date.parse(inst.deadline ?? '');
    await d.stop();
    await d.start();
    expect((await d.client.getInstance('kept')).deadline).toBe(inst.deadline);
    for (let i = 0; i < 150 && (await d.client.getInstance('kept')).state !== 'stopped'; i++) await sleep(100);
    expect((await d.client.getInstance('kept')).state).toBe('stopped');
    expect(Date.now()).toBeGreaterThanOrEqual(deadline);
  });
});
