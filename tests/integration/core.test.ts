/**
 * The core path, end to end: the real CLI, a real aegisd, real VMs booted by QEMU, and
 * assertions on what came out of the guest.
 */
import { execFile } from 'node:child_process';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { ROOT, qemuProcessesFor, untilNothingLeft, useDaemon } from './fixture.js';

const daemon = useDaemon();

function rawRequest(socketPath: string, method: string, urlPath: string, body: string): Promise<{ status: number; json: unknown }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ socketPath, method, path: urlPath, headers: { 'content-type': 'application/json' } }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) as unknown }));
    });
    req.once('error', reject);
    req.end(body);
  });
}

describe('aegis run', () => {
  it('prints hello produced inside the guest and exits 0', async () => {
    const r = await daemon().cli(['run', '--', 'echo', 'hello']);
    expect(r.stderr).toBe('');
    expect(r.stdout).toBe('hello\n');
    expect(r.code).toBe(0);
  });

  it('runs the guest kernel, not the host one', async () => {
    const r = await daemon().cli(['run', '--', 'uname', '-r']);
    expect(r.code).toBe(0);
    expect(r.stdout.trim()).toMatch(/^6\.1\.\d+/);
    expect(r.stdout.trim()).not.toBe(os.release());
  });

  it('keeps stdout and stderr apart and exits with the workload exit code', async () => {
    const r = await daemon().cli(['run', '--', 'sh', '-c', 'echo out; echo err >&2; exit 3']);
    expect(r.stdout).toBe('out\n');
    expect(r.stderr).toBe('err\n');
    expect(r.code).toBe(3);
  });

  it('leaves no QEMU process and no instance files behind', async () => {
    const d = daemon();
    const r = await d.cli(['run', '--name', 'gone', '--', 'true']);
    expect(r.code).toBe(0);
    // run returned at the workload's exit; the VM and the instance go behind it.
    await untilNothingLeft(d);
  });

  it('gives each instance its own writable layer over the shared read-only image', async () => {
    const d = daemon();
    const w = await d.cli(['run', '--', 'sh', '-c', 'echo scribble > /usr/local/mark && cat /usr/local/mark']);
    expect(w.stdout).toBe('scribble\n');
    const r = await d.cli(['run', '--', 'sh', '-c', 'test -e /usr/local/mark && echo leaked || echo clean']);
    expect(r.stdout).toBe('clean\n');
  });

  it('has python3 in the base image', async () => {
    const r = await daemon().cli(['run', '--', 'python3', '-c', 'print(6*7)']);
    expect(r.stdout).toBe('42\n');
  });

  it('reports a command missing in the guest with NOT_FOUND and exits non-zero', async () => {
    const r = await daemon().cli(['run', '--', 'no-such-command-xyz']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/command not found: no-such-command-xyz \[NOT_FOUND\]\n$/);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
  });
});

describe('a background instance', () => {
  it('starts, lists, execs, logs, stops and deletes, leaving nothing behind', async () => {
    const d = daemon();
    const started = await d.cli(['instance', 'start', '--name', 'web', '--', 'sh', '-c', 'echo booted; exec sleep 600']);
    expect(started.stderr).toBe('');
    expect(started.stdout).toBe('web\n');

    const list = await d.cli(['instance', 'list']);
    expect(list.stdout).toMatch(/^web\s+[0-9a-f]{12}\s+running\s/m);

    const exec = await d.cli(['exec', 'web', '--', 'sh', '-c', 'echo hello; echo oops >&2; exit 4']);
    expect(exec.stdout).toBe('hello\n');
    expect(exec.stderr).toBe('oops\n');
    expect(exec.code).toBe(4);

    const logs = await d.cli(['logs', 'web']);
    expect(logs.stdout).toBe('booted\n');

    const info = JSON.parse((await d.cli(['instance', 'info', 'web', '--json'])).stdout) as { id: string; state: string };
    expect(info.state).toBe('running');
    // An id prefix works wherever a handle does.
    expect((await d.cli(['exec', info.id.slice(0, 6), '--', 'true'])).code).toBe(0);

    expect((await d.cli(['instance', 'stop', 'web'])).code).toBe(0);
    const stopped = await d.client.getInstance('web');
    expect(stopped.state).toBe('stopped');
    expect(await qemuProcessesFor(d.home)).toEqual([]);
    // Logs outlive the VM.
    expect((await d.cli(['logs', 'web'])).stdout).toBe('booted\n');

    expect((await d.cli(['instance', 'delete', 'web'])).code).toBe(0);
    expect(d.instanceDirs()).toEqual([]);
    const gone = await d.cli(['instance', 'info', 'web']);
    expect(gone.code).not.toBe(0);
    expect(gone.stderr).toMatch(/\[NOT_FOUND\]/);
  });

  it('turns stopped with its exit code when the workload exits by itself', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'brief', command: ['sh', '-c', 'exit 7'] });
    for (let i = 0; i < 100; i++) {
      const inst = await d.client.getInstance('brief');
      if (inst.state === 'stopped') {
        expect(inst.exitCode).toBe(7);
        break;
      }
      await new Promise((r) => setTimeout(r, 100));
    }
    expect((await d.client.getInstance('brief')).state).toBe('stopped');
    expect(await qemuProcessesFor(d.home)).toEqual([]);
    await d.client.deleteInstance('brief');
  });

  it('pauses (guest frozen, exec refused) and resumes', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'p', command: ['sleep', '600'] });
    expect((await d.cli(['instance', 'pause', 'p'])).code).toBe(0);
    const refused = await d.cli(['exec', 'p', '--', 'true']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/paused; resume it first: aegis instance resume p \[FAILED_PRECONDITION\]/);
    expect((await d.cli(['instance', 'resume', 'p'])).code).toBe(0);
    expect((await d.cli(['exec', 'p', '--', 'echo', 'back'])).stdout).toBe('back\n');
    expect((await d.cli(['instance', 'delete', '--force', 'p'])).code).toBe(0);
    expect(await qemuProcessesFor(d.home)).toEqual([]);
  });
});

describe('aegisd restart', () => {
  it('finds a running instance again after aegisd is killed with SIGKILL', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'survivor', command: ['sleep', '600'] });
    const vmsBefore = await qemuProcessesFor(d.home);
    expect(vmsBefore).toHaveLength(1);
    await d.kill();
    expect(await qemuProcessesFor(d.home)).toEqual(vmsBefore);
    await d.start();
    const list = await d.cli(['instance', 'list']);
    expect(list.stdout).toMatch(/^survivor\s+\S+\s+running\s/m);
    const exec = await d.cli(['exec', 'survivor', '--', 'echo', 'still here']);
    expect(exec.stdout).toBe('still here\n');
    expect((await d.cli(['instance', 'delete', '-f', 'survivor'])).code).toBe(0);
    expect(await qemuProcessesFor(d.home)).toEqual([]);
  });
});

describe('bad input', () => {
  it('an unknown handle is NOT_FOUND, in one line', async () => {
    const r = await daemon().cli(['exec', 'nope', '--', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toBe('aegis: no instance "nope" (see: aegis instance list --all) [NOT_FOUND]\n');
  });

  it('an empty command, a malformed body and an unknown field are INVALID_ARGUMENT, and the daemon keeps serving', async () => {
    const d = daemon();
    const sock = path.join(d.home, 'aegisd.sock');
    const empty = await rawRequest(sock, 'POST', '/v1/instances', JSON.stringify({ command: [] }));
    expect(empty.status).toBe(400);
    expect(empty.json).toMatchObject({ code: 'INVALID_ARGUMENT' });
    const malformed = await rawRequest(sock, 'POST', '/v1/instances', '{"command": ["echo"');
    expect(malformed.json).toEqual({ code: 'INVALID_ARGUMENT', message: 'request body is not valid JSON' });
    const unknown = await rawRequest(sock, 'POST', '/v1/instances', JSON.stringify({ command: ['true'], bogus: 1 }));
    expect(unknown.json).toEqual({ code: 'INVALID_ARGUMENT', message: 'invalid request: body unknown field "bogus"' });
    const route = await rawRequest(sock, 'GET', '/v1/nothing', '');
    expect(route.json).toMatchObject({ code: 'NOT_FOUND' });
    expect((await d.client.status()).pid).toBe(d.pid);
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });

  it('a taken handle is ALREADY_EXISTS before any VM boots', async () => {
    const d = daemon();
    await d.client.createInstance({ handle: 'twin', command: ['sleep', '600'] });
    const r = await d.cli(['instance', 'start', '--name', 'twin', '--', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/already exists.*\[ALREADY_EXISTS\]\n$/);
    expect(await qemuProcessesFor(d.home)).toHaveLength(1);
    await d.client.deleteInstance('twin', { force: true });
  });

  it('the CLI says in one line when the daemon is not running, and how to start it', async () => {
    const home = `/tmp/aegis-none-${process.pid}`;
    const out = await new Promise<{ code: number; stderr: string }>((resolve) =>
      execFile(path.join(ROOT, 'bin/aegis'), ['instance', 'list'], { env: { ...process.env, AEGIS_HOME: home } }, (err, _o, stderr) =>
        resolve({ code: err ? Number(err.code) : 0, stderr }),
      ),
    );
    expect(out.code).toBe(1);
    expect(out.stderr).toBe(`aegis: aegisd is not running (no daemon at ${home}/aegisd.sock); start it with: aegis up [UNAVAILABLE]\n`);
  });
});
