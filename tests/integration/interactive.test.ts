/** Input and signals: stdin piped into exec, Ctrl-C forwarded by run and exec. */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, untilNothingLeft, useDaemon } from './fixture.js';

const daemon = useDaemon();

/** Starts the real CLI, waits for `marker` on its stdout, sends SIGINT, collects the rest. */
function interruptWhen(
  args: string[],
  env: NodeJS.ProcessEnv,
  marker: string,
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(path.join(ROOT, 'bin/aegis'), args, { env });
    let stdout = '';
    let stderr = '';
    let sent = false;
    child.stdout.on('data', (c: Buffer) => {
      stdout += c.toString();
      if (!sent && stdout.includes(marker)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    child.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
    child.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

describe('stdin', () => {
  it('echo hi | aegis exec -i web -- cat prints hi', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'web', command: ['sleep', '600'] });
    const r = await d.cli(['exec', '-i', 'web', '--', 'cat'], { input: 'hi\n' });
    expect(r.stdout).toBe('hi\n');
    expect(r.code).toBe(0);
    // Without -i the command reads an empty stdin and does not hang.
    const closed = await d.cli(['exec', 'web', '--', 'cat'], { input: 'ignored\n' });
    expect(closed.stdout).toBe('');
    expect(closed.code).toBe(0);
    // Larger input arrives whole, in order.
    const big = Array.from({ length: 20000 }, (_, i) => `line ${i}`).join('\n') + '\n';
    const wc = await d.cli(['exec', '-i', 'web', '--', 'sh', '-c', 'wc -l; '], { input: big });
    expect(wc.stdout.trim()).toBe('20000');
  });
});

describe('Ctrl-C', () => {
  it('aegis run forwards SIGINT to the workload, exits with its status, and leaves nothing running', async () => {
    const d = daemon();
    const r = await interruptWhen(
      ['run', '--', 'sh', '-c', 'trap "echo got INT; exit 5" INT; echo ready; while :; do sleep 0.1; done'],
      d.env,
      'ready',
    );
    expect(r.stdout).toBe('ready\ngot INT\n');
    expect(r.code).toBe(5);
    await untilNothingLeft(d);
  });

  it('aegis exec forwards SIGINT to the command in the guest', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'sig', command: ['sleep', '600'] });
    const r = await interruptWhen(
      ['exec', 'sig', '--', 'sh', '-c', 'trap "echo bye; exit 7" INT; echo ready; while :; do sleep 0.1; done'],
      d.env,
      'ready',
    );
    expect(r.stdout).toBe('ready\nbye\n');
    expect(r.code).toBe(7);
  });

  it('a bad signal name is INVALID_ARGUMENT', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 's2', command: ['sleep', '600'] });
    await expect(d.client.signalInstance('s2', 'SIGNOPE')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(d.client.signalInstance('s2', 'kill')).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });
});
