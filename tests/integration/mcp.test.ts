/**
 * `aegis mcp` driven end to end by the official MCP TypeScript SDK's Client over stdio,
 * against a real daemon and real VMs: tool listing, a run, a file round trip, an error with
 * our code, output capping, and cleanup.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { afterEach, describe, expect, it } from 'vitest';
import { ROOT, useDaemon } from './fixture.js';

const daemon = useDaemon();
let client: Client | undefined;
afterEach(async () => {
  await client?.close();
  client = undefined;
});

type Result = { content: { type: string; text: string }[]; isError?: boolean; structuredContent?: Record<string, unknown> };

async function connect(home: string, args: string[] = []): Promise<Client> {
  const transport = new StdioClientTransport({
    command: path.join(ROOT, 'bin/aegis'),
    args: ['mcp', ...args],
    env: { ...(process.env as Record<string, string>), AEGIS_HOME: home },
    stderr: 'pipe',
  });
  const c = new Client({ name: 'aegis-test', version: '1.0.0' });
  await c.connect(transport);
  return c;
}

async function call(c: Client, name: string, args: Record<string, unknown>): Promise<Result> {
  return (await c.callTool({ name, arguments: args })) as Result;
}

describe('aegis mcp', () => {
  it('lists its tools with JSON Schemas, runs a command, round-trips a file, caps output, reports errors with our code, and cleans up', async () => {
    const d = daemon();
    client = await connect(d.home);
    const tools = (await client.listTools()).tools;
    expect(tools.map((t) => t.name).sort()).toEqual([
      'create_sandbox',
      'delete_sandbox',
      'fork_sandbox',
      'list_files',
      'list_sandboxes',
      'logs',
      'pause_sandbox',
      'read_file',
      'run_command',
      'snapshot_sandbox',
      'start_sandbox',
      'stop_sandbox',
      'write_file',
    ]);
    const run = tools.find((t) => t.name === 'run_command');
    expect(run?.inputSchema).toMatchObject({ type: 'object', required: expect.arrayContaining(['sandbox', 'command']) as unknown });
    // Standard JSON Schema only (no zod "format": "starts_with"), every parameter described, every tool annotated.
    expect(JSON.stringify(tools)).not.toContain('starts_with');
    expect(tools.find((t) => t.name === 'read_file')?.inputSchema.properties?.['path']).toMatchObject({ type: 'string', pattern: '^\\/' });
    for (const t of tools) {
      for (const [name, prop] of Object.entries(t.inputSchema.properties ?? {})) {
        expect((prop as { description?: string }).description, `${t.name}.${name}`).toBeTruthy();
      }
      expect(t.annotations?.readOnlyHint, t.name).toBeTypeOf('boolean');
    }
    expect(tools.find((t) => t.name === 'delete_sandbox')?.annotations).toMatchObject({ destructiveHint: true, readOnlyHint: false });

    const created = await call(client, 'create_sandbox', { env: { WHO: 'agent' }, network: 'none' });
    expect(created.isError).toBeFalsy();
    const id = created.structuredContent?.['id'] as string;
    expect((await d.client.getInstance(id)).labels).toEqual({ 'aegis.mcp': '1' });

    const hi = await call(client, 'run_command', { sandbox: id, command: 'echo "hi $WHO"; echo oops >&2; exit 2' });
    expect(hi.structuredContent).toMatchObject({ exitCode: 2, stdout: 'hi agent\n', stderr: 'oops\n', truncated: false, timedOut: false });
    expect(hi.content[0]?.text).toMatch(/^exit code 2\n--- stdout ---\nhi agent\n/);

    const big = await call(client, 'run_command', { sandbox: id, command: 'head -c 100000 /dev/zero | tr "\\0" a' });
    expect(big.structuredContent?.['truncated']).toBe(true);
    expect(big.structuredContent?.['stdout']).toMatch(/^a{32768}\n\[truncated: 67232 more bytes\]$/);

    const slow = await call(client, 'run_command', { sandbox: id, command: 'sleep 100', timeoutSeconds: 2 });
    expect(slow.structuredContent).toMatchObject({ timedOut: true });

    expect((await call(client, 'write_file', { sandbox: id, path: '/work/notes/a.txt', content: 'from the agent\n' })).isError).toBeFalsy();
    expect((await call(client, 'read_file', { sandbox: id, path: '/work/notes/a.txt' })).content[0]?.text).toBe('from the agent\n');
    expect((await call(client, 'list_files', { sandbox: id, path: '/work/notes' })).structuredContent).toMatchObject({
      entries: [{ name: 'a.txt', type: 'file', size: 15 }],
    });
    expect((await call(client, 'logs', { sandbox: id })).content[0]?.text).toContain('hi agent');

    const missing = await call(client, 'read_file', { sandbox: id, path: '/nope' });
    expect(missing.isError).toBe(true);
    expect(missing.content[0]?.text).toBe('NOT_FOUND: /nope: no such file or directory');
    const noBox = await call(client, 'run_command', { sandbox: 'no-such-sandbox', command: 'true' });
    expect(noBox.isError).toBe(true);
    expect(noBox.content[0]?.text).toMatch(/^NOT_FOUND: /);

    expect((await call(client, 'list_sandboxes', {})).structuredContent).toMatchObject({ sandboxes: [{ id, state: 'running' }] });

    // Parked and started again through MCP (a newcomer's trip: a stopped sandbox could not be
    // started again): its files and processes are as they were.
    await call(client, 'run_command', { sandbox: id, command: 'sleep 1000 & echo $! > /tmp/bg.pid' });
    expect((await call(client, 'pause_sandbox', { sandbox: id })).structuredContent).toMatchObject({ id, state: 'hibernated' });
    expect((await call(client, 'list_sandboxes', {})).structuredContent).toMatchObject({ sandboxes: [{ id, state: 'hibernated' }] });
    expect((await call(client, 'start_sandbox', { sandbox: id })).structuredContent).toMatchObject({ id, state: 'running' });
    const again = await call(client, 'run_command', {
      sandbox: id,
      command: 'cat /work/notes/a.txt; kill -0 $(cat /tmp/bg.pid) && echo alive',
    });
    expect(again.structuredContent).toMatchObject({ exitCode: 0, stdout: 'from the agent\nalive\n' });
    expect((await call(client, 'start_sandbox', { sandbox: id })).structuredContent).toMatchObject({ state: 'running' }); // idempotent

    // A copy that carries on (fork), and one started later from a saved point (snapshot): both
    // the agent's, with the files as they were.
    const forked = await call(client, 'fork_sandbox', { sandbox: id });
    const forkId = (forked.structuredContent?.['sandboxes'] as { id: string }[] | undefined)?.[0]?.id ?? '';
    expect((await call(client, 'read_file', { sandbox: forkId, path: '/work/notes/a.txt' })).content[0]?.text).toBe('from the agent\n');
    const saved = await call(client, 'snapshot_sandbox', { sandbox: id, name: 'agent-point' });
    expect(saved.structuredContent).toMatchObject({ snapshot: 'agent-point' });
    const fromSnap = await call(client, 'create_sandbox', { snapshot: 'agent-point' });
    const fromId = fromSnap.structuredContent?.['id'] as string;
    expect((await call(client, 'run_command', { sandbox: fromId, command: 'cat /work/notes/a.txt' })).structuredContent).toMatchObject({
      stdout: 'from the agent\n',
    });
    for (const s of [forkId, fromId]) expect((await call(client, 'delete_sandbox', { sandbox: s })).isError).toBeFalsy();
    await d.client.deleteSnapshot('agent-point');

    expect((await call(client, 'delete_sandbox', { sandbox: id })).isError).toBeFalsy();
    expect(await d.client.listInstances({ all: true })).toEqual([]);
  });

  it("acts only on its own sandboxes: a user's instance beside them is not found by any tool, by name, id or prefix; --all opens it", async () => {
    const d = daemon();
    const mine = await d.client.createInstance({
      handle: 'users-own',
      command: ['sleep', '600'],
      network: 'none',
      env: { TOKEN: 's3cret' },
    });
    client = await connect(d.home);
    const created = await call(client, 'create_sandbox', { network: 'none', name: 'agents' });
    const agents = created.structuredContent?.['id'] as string;
    const refs = ['users-own', mine.id, mine.id.slice(0, 2)].filter((r) => !agents.startsWith(r));
    for (const sandbox of refs) {
      for (const [tool, args] of [
        ['run_command', { command: 'env' }],
        ['read_file', { path: '/etc/hostname' }],
        ['write_file', { path: '/tmp/x', content: 'x' }],
        ['list_files', { path: '/' }],
        ['logs', {}],
        ['stop_sandbox', {}],
        ['pause_sandbox', {}],
        ['start_sandbox', {}],
        ['delete_sandbox', {}],
      ] as const) {
        const r = await call(client, tool, { sandbox, ...args });
        expect(r.isError, `${tool} ${sandbox}`).toBe(true);
        // The same answer as for a name that does not exist: no existence oracle.
        expect(r.content[0]?.text).toBe(`NOT_FOUND: no sandbox "${sandbox}" (list_sandboxes shows the ones this server can use)`);
      }
    }
    expect((await call(client, 'list_sandboxes', {})).structuredContent).toMatchObject({ sandboxes: [{ id: agents }] });
    expect((await d.client.getInstance(mine.id)).state).toBe('running');
    // Nor may it start a copy of the user's instance from a snapshot of it.
    await d.client.createSnapshot(mine.id, { name: 'users-snap' });
    const copy = await call(client, 'create_sandbox', { snapshot: 'users-snap' });
    expect(copy.content[0]?.text).toBe('NOT_FOUND: no snapshot "users-snap" (snapshot_sandbox makes them)');
    await d.client.deleteSnapshot('users-snap');
    expect((await call(client, 'run_command', { sandbox: 'agents', command: 'echo ok' })).structuredContent).toMatchObject({
      stdout: 'ok\n',
    });
    await client.close();

    client = await connect(d.home, ['--all']);
    const all = await call(client, 'run_command', { sandbox: 'users-own', command: 'echo $TOKEN' });
    expect(all.structuredContent).toMatchObject({ exitCode: 0, stdout: 's3cret\n' });
    // A kept instance that stopped boots again through start_sandbox, its files with it.
    await call(client, 'write_file', { sandbox: 'users-own', path: '/root/kept.txt', content: 'kept\n' });
    expect((await call(client, 'stop_sandbox', { sandbox: 'users-own' })).structuredContent).toMatchObject({ state: 'stopped' });
    expect((await call(client, 'start_sandbox', { sandbox: 'users-own' })).structuredContent).toMatchObject({ state: 'running' });
    expect((await call(client, 'read_file', { sandbox: 'users-own', path: '/root/kept.txt' })).content[0]?.text).toBe('kept\n');
    await call(client, 'delete_sandbox', { sandbox: agents });
    await d.client.deleteInstance(mine.id, { force: true });
  });

  it('install prints a snippet that starts this CLI as an MCP server', async () => {
    const d = daemon();
    const r = await d.cli(['mcp', 'install']);
    const cfg = JSON.parse(r.stdout) as { mcpServers: { aegis: { command: string; args: string[]; env?: Record<string, string> } } };
    expect(cfg.mcpServers.aegis.args.at(-1)).toBe('mcp');
    expect(cfg.mcpServers.aegis.env).toEqual({ AEGIS_HOME: d.home });
    const all = JSON.parse((await d.cli(['mcp', 'install', '--all'])).stdout) as { mcpServers: { aegis: { args: string[] } } };
    expect(all.mcpServers.aegis.args.slice(-2)).toEqual(['mcp', '--all']);
    // Each client its file and format, said on stderr; VS Code's is `servers` with a type.
    const cursor = await d.cli(['mcp', 'install', '--client', 'cursor']);
    expect(cursor.stderr).toMatch(/^aegis: this goes in \/.*\.cursor\/mcp\.json \(under "mcpServers"\)/);
    const vscode = await d.cli(['mcp', 'install', '--client', 'vscode']);
    expect(JSON.parse(vscode.stdout)).toMatchObject({ servers: { aegis: { type: 'stdio', command: process.execPath } } });
    expect(vscode.stderr).toContain('.vscode/mcp.json');
    const unknown = await d.cli(['mcp', 'install', '--client', 'emacs']);
    expect([unknown.code, unknown.stdout, unknown.stderr]).toEqual([
      2,
      '',
      expect.stringMatching(/^aegis: unknown MCP client "emacs": use claude, claude-code, cursor, vscode, project \[INVALID_ARGUMENT\]\n$/),
    ]);
  });

  it('survives an oversized and a malformed message: each gets a JSON-RPC error, stderr says why, the next call works', async () => {
    const d = daemon();
    const child = spawn(path.join(ROOT, 'bin/aegis'), ['mcp'], {
      env: { ...process.env, AEGIS_HOME: d.home },
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    let err = '';
    child.stdout.on('data', (c: Buffer) => (out += c.toString()));
    child.stderr.on('data', (c: Buffer) => (err += c.toString()));
    const replies = (): Record<string, unknown>[] =>
      out
        .split('\n')
        .filter((l) => l)
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    const until = async (n: number): Promise<void> => {
      for (let i = 0; i < 300 && replies().length < n; i++) await new Promise((r) => setTimeout(r, 50));
    };
    // 12 MiB in one line, over the 8 MiB limit: before, the server exited 0 with nothing said.
    child.stdin.write(`{"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"pad":"${'x'.repeat(12 * 1024 * 1024)}"}}\n`);
    child.stdin.write('{oops\n');
    child.stdin.write(`${JSON.stringify({ jsonrpc: '2.0', id: 2, method: 'ping' })}\n`);
    await until(3);
    expect(replies()).toEqual([
      { jsonrpc: '2.0', id: null, error: { code: -32600, message: `message over ${8 * 1024 * 1024} bytes refused` } },
      { jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse error: the line is not JSON' } },
      { jsonrpc: '2.0', id: 2, result: {} },
    ]);
    expect(err).toMatch(/message over \d+ bytes refused/);
    expect(child.exitCode).toBeNull();
    child.stdin.end();
    await new Promise((r) => child.once('exit', r));
    expect(err).toMatch(/stdin closed; exiting/);
  });
});
