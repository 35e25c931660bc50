/** exec -t: a real terminal in the guest, driven through the API and through the CLI under tmux. */
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import type { AegisClient } from '@aegis/client';
import { ROOT, useDaemon } from './fixture.js';

const daemon = useDaemon();

/** A terminal session over the API: type into it, wait for what it prints. */
async function terminal(client: AegisClient, ref: string, command: string[]) {
  let screen = '';
  let execId = '';
  let exitCode: number | null | undefined;
  const events = client.exec(ref, { command, stdin: true, tty: { rows: 24, cols: 80 } });
  const done = (async () => {
    for await (const ev of events) {
      if (ev.type === 'started') execId = ev.execId;
      if (ev.type === 'output') screen += Buffer.from(ev.data, 'base64').toString();
      if (ev.type === 'exit') exitCode = ev.exitCode;
    }
  })();
  const until = async (re: RegExp, from: number): Promise<string> => {
    for (let i = 0; i < 200; i++) {
      const seen = screen.slice(from);
      if (re.test(seen)) return seen;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`terminal never showed ${re}; it shows:\n${screen}`);
  };
  await until(/# $/, 0); // the shell's prompt
  return {
    async type(keys: string, expect: RegExp): Promise<string> {
      const from = screen.length;
      await client.execInput(ref, execId, { data: Buffer.from(keys) });
      return until(expect, from);
    },
    resize: (rows: number, cols: number) => client.resizeExec(ref, execId, { rows, cols }),
    async exit(): Promise<number | null | undefined> {
      await done;
      return exitCode;
    },
    get execId() {
      return execId;
    },
  };
}

describe('exec with a terminal', () => {
  it('gives an interactive shell a real PTY: size, resize, Ctrl-C to the guest process, exit status', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 't', command: ['sleep', '600'] });
    const t = await terminal(d.client, 't', ['sh']);
    expect(await t.type('tty; stty size\r', /\/dev\/pts\/\d+\r\n24 80\r\n# $/)).toBeTruthy();
    await t.resize(40, 120);
    expect(await t.type('stty size\r', /40 120\r\n# $/)).toBeTruthy();
    // ^C reaches the foreground process in the guest through the terminal, not the host.
    await t.type('sleep 600\r', /sleep 600\r\n$/);
    expect(await t.type('\x03', /# $/)).toBeTruthy();
    expect(await t.type('echo status=$?\r', /status=130\r\n# $/)).toBeTruthy();
    await t.type('exit 3\r', /exit 3/);
    expect(await t.exit()).toBe(3);
  });

  it('an interactive shell works from the CLI under a terminal (tmux): prompt, line editing, Ctrl-C', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'tm', command: ['sleep', '600'] });
    const session = `aegis-test-${process.pid}`;
    const tmux = (...args: string[]): string => execFileSync('tmux', args, { encoding: 'utf8' });
    const env = Object.entries({ AEGIS_HOME: d.home })
      .map(([k, v]) => `${k}=${v}`)
      .join(' ');
    tmux(
      'new-session',
      '-d',
      '-s',
      session,
      '-x',
      '100',
      '-y',
      '30',
      `env ${env} ${path.join(ROOT, 'bin/aegis')} exec -it tm -- bash --norc -i`,
    );
    try {
      const screen = async (re: RegExp): Promise<string> => {
        for (let i = 0; i < 200; i++) {
          const s = tmux('capture-pane', '-p', '-t', session);
          if (re.test(s)) return s;
          await new Promise((r) => setTimeout(r, 50));
        }
        throw new Error(`tmux never showed ${re}:\n${tmux('capture-pane', '-p', '-t', session)}`);
      };
      await screen(/bash-\d+\.\d+#\s*$/m); // capture-pane trims trailing blanks
      // Line editing happens in the guest: type, move left, insert, run.
      tmux('send-keys', '-t', session, 'echo wrld', 'Left', 'Left', 'Left', 'o', 'Enter');
      await screen(/^world$/m);
      tmux('send-keys', '-t', session, 'stty size', 'Enter');
      await screen(/^30 100$/m);
      tmux('send-keys', '-t', session, 'sleep 600', 'Enter');
      tmux('send-keys', '-t', session, 'C-c');
      tmux('send-keys', '-t', session, 'echo after=$?', 'Enter');
      await screen(/^after=130$/m);
      tmux('send-keys', '-t', session, 'exit', 'Enter');
      // The shell's exit ends `aegis exec`, which ends the tmux session.
      const alive = (): boolean => {
        try {
          return tmux('list-sessions').includes(session);
        } catch {
          return false; // no tmux server left at all
        }
      };
      // Up to 20 s: on a loaded 2-core machine the guest's teardown of the shell can take a while
      // (5 s was once not enough in a full CI run); what matters is that it ends.
      for (let i = 0; i < 200 && alive(); i++) await new Promise((r) => setTimeout(r, 100));
      expect(alive()).toBe(false);
    } finally {
      try {
        tmux('kill-session', '-t', session);
      } catch {
        // already ended with the shell
      }
    }
  });
});
