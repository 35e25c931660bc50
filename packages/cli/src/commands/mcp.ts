/**
 * `aegis mcp`: the Model Context Protocol server, on stdio, with the official TypeScript SDK.
 * An agent gets tools to create a sandbox, run commands in it (time-limited, output capped and
 * marked truncated), read, write and list its files, read its logs, stop and delete it. Every
 * sandbox it creates carries the label `aegis.mcp=1`, so `aegis ps --filter label=aegis.mcp`
 * finds what an agent left, and every tool acts only on such sandboxes unless `--all` is given. Errors are MCP tool errors whose text starts with our code.
 * `aegis mcp install` prints (or writes) the configuration snippet MCP clients read.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { AegisClient, AegisError, type ExecEvent } from '@aegis/client';
import { BoundedStdioTransport } from '../mcp-transport.js';
import { fail } from '../util.js';

export const MCP_LABEL = 'aegis.mcp';
/** Per stream, what a tool result carries of a command's output; the rest is counted, not sent. */
const MAX_OUTPUT_BYTES = 32 * 1024;
const MAX_FILE_BYTES = 256 * 1024;
const DEFAULT_COMMAND_TIMEOUT_S = 60;
const DEFAULT_SANDBOX_TIMEOUT_S = 3600;

type ToolResult = { content: { type: 'text'; text: string }[]; isError?: boolean; structuredContent?: Record<string, unknown> };

function ok(value: Record<string, unknown>, text?: string): ToolResult {
  return { content: [{ type: 'text', text: text ?? JSON.stringify(value, null, 2) }], structuredContent: value };
}

/**
 * An error as the agent sees it: the stable code first, then the message. The daemon's messages
 * name CLI commands for a person at a terminal; the model cannot run them, so it is told whose
 * step that is.
 */
function toolError(err: unknown): ToolResult {
  const e = AegisError.from(err);
  const forUser = /\baegis [a-z]/.test(e.message)
    ? ' (the `aegis` command named here is for the user of this machine, not a tool of yours: tell them)'
    : '';
  return {
    content: [{ type: 'text', text: `${e.code}: ${e.message}${forUser}` }],
    isError: true,
    structuredContent: { code: e.code, message: e.message },
  };
}

/** Keeps the first `max` bytes of a stream's output, counting what it drops. */
class Capped {
  private chunks: Buffer[] = [];
  private kept = 0;
  dropped = 0;
  push(b: Buffer): void {
    const room = MAX_OUTPUT_BYTES - this.kept;
    if (room > 0) {
      const part = b.subarray(0, room);
      this.chunks.push(part);
      this.kept += part.length;
    }
    this.dropped += Math.max(0, b.length - Math.max(room, 0));
  }
  text(): string {
    const s = Buffer.concat(this.chunks).toString('utf8');
    return this.dropped > 0 ? `${s}\n[truncated: ${this.dropped} more bytes]` : s;
  }
}

/**
 * What this server may name. By default only the sandboxes MCP servers created (the label):
 * the agent is the party we trust least, and a user's own instances (their secrets, their
 * files) are not its to read or delete. A name or id outside the scope is "not found", the
 * same answer as for one that does not exist. `--all` (explicit) opens every instance.
 */
class Scope {
  constructor(
    private readonly api: AegisClient,
    readonly all: boolean,
  ) {}

  /** The full id of the sandbox `ref` names (a name, an id, a unique id prefix), within scope. */
  async resolve(ref: string): Promise<string> {
    if (this.all) return ref;
    const mine = await this.api.listInstances({ all: true, labels: [MCP_LABEL] });
    const byName = mine.find((i) => i.handle === ref);
    const byId = ref === '' ? [] : mine.filter((i) => i.id.startsWith(ref));
    if (byName) return byName.id;
    if (byId.length > 1) throw new AegisError('INVALID_ARGUMENT', `"${ref}" matches more than one sandbox id; give more characters`);
    if (byId[0]) return byId[0].id;
    throw new AegisError('NOT_FOUND', `no sandbox "${ref}" (list_sandboxes shows the ones this server can use)`);
  }

  /** A snapshot this server may start from: one of a sandbox MCP created (with --all, any). */
  async snapshot(name: string): Promise<void> {
    if (this.all) return;
    const s = await this.api.getSnapshot(name).catch(() => undefined);
    if (!s?.labels || s.labels[MCP_LABEL] !== '1') {
      throw new AegisError('NOT_FOUND', `no snapshot "${name}" (snapshot_sandbox makes them)`);
    }
  }

  /** The labels `list_sandboxes` filters on (none with --all). */
  labels(): string[] {
    return this.all ? [] : [MCP_LABEL];
  }
}

async function serve(options: { all?: boolean }): Promise<void> {
  const [{ McpServer }, { JSONRPCMessageSchema }, { z }] = await Promise.all([
    import('@modelcontextprotocol/sdk/server/mcp.js'),
    import('@modelcontextprotocol/sdk/types.js'),
    import('zod'),
  ]);
  const api = new AegisClient();
  const scope = new Scope(api, options.all === true);
  const server = new McpServer({ name: 'aegis', version: '0.1.0' });
  const sandbox = z.string().min(1).describe('sandbox id or name (from create_sandbox)');
  // A pattern, not zod's startsWith (which becomes a non-standard "format" in the JSON Schema).
  const absolutePath = (what: string): ReturnType<typeof z.string> =>
    z.string().regex(/^\//, 'an absolute path (starting with /)').describe(what);
  const guarded =
    <A>(fn: (args: A) => Promise<ToolResult>) =>
    async (args: A): Promise<ToolResult> => {
      try {
        return await fn(args);
      } catch (err) {
        return toolError(err);
      }
    };

  server.registerTool(
    'create_sandbox',
    {
      description:
        'Start a new isolated Linux microVM (a sandbox) to run untrusted code in. Returns its id; pass it to the other tools. Delete it when done.',
      inputSchema: {
        image: z.string().optional().describe('OCI image reference, e.g. python:3.12 (default: a Debian base with python3)'),
        env: z.record(z.string(), z.string()).optional().describe('environment variables for every command'),
        ports: z.array(z.number().int().min(1).max(65535)).optional().describe('guest TCP ports to make reachable from the host'),
        network: z
          .enum(['user', 'none'])
          .optional()
          .describe(
            "'user' (default): outbound TCP and DNS to public addresses (private, LAN and metadata addresses refused); 'none': no network",
          ),
        egressAllow: z
          .array(z.string().min(1).max(300))
          .max(256)
          .optional()
          .describe(
            'reach only these destinations: names (pypi.org), *.suffix, public IPs or CIDRs, optional :PORT; private ranges stay refused',
          ),
        egressDeny: z
          .array(z.string().min(1).max(300))
          .max(256)
          .optional()
          .describe('never reach these destinations (same patterns; wins over egressAllow)'),
        memoryMiB: z.number().int().min(128).max(65536).optional().describe('guest memory in MiB (default 512)'),
        name: z.string().optional().describe('a unique name for it'),
        timeoutSeconds: z
          .number()
          .int()
          .min(0)
          .max(86_400)
          .optional()
          .describe('stop and delete it this long after creation even if nobody asks (default 3600; 0: never)'),
        snapshot: z
          .string()
          .min(1)
          .max(128)
          .optional()
          .describe(
            'start from this snapshot (from snapshot_sandbox) instead: its processes and files carry on; image, env, network, egress and memory are then the snapshot’s',
          ),
      },
      annotations: { title: 'Create a sandbox', readOnlyHint: false, destructiveHint: false, openWorldHint: true },
    },
    guarded(
      async (a: {
        image?: string;
        env?: Record<string, string>;
        ports?: number[];
        network?: 'user' | 'none';
        egressAllow?: string[];
        egressDeny?: string[];
        memoryMiB?: number;
        name?: string;
        timeoutSeconds?: number;
        snapshot?: string;
      }) => {
        if (a.snapshot !== undefined) {
          await scope.snapshot(a.snapshot);
          const inst = await api.createInstance({
            snapshot: a.snapshot,
            labels: { [MCP_LABEL]: '1' },
            autoRemove: true,
            timeoutMs: (a.timeoutSeconds ?? DEFAULT_SANDBOX_TIMEOUT_S) * 1000,
            ...(a.name ? { handle: a.name } : {}),
          });
          const ports = Object.fromEntries(inst.ports.map((p) => [String(p.guestPort), `${p.hostIp}:${p.hostPort}`]));
          return ok({ id: inst.id, name: inst.handle, state: inst.state, ports });
        }
        const inst = await api.createInstance({
          command: ['sleep', 'infinity'],
          labels: { [MCP_LABEL]: '1' },
          autoRemove: true,
          // An agent forgets: a sandbox it started ends by itself unless asked otherwise.
          timeoutMs: (a.timeoutSeconds ?? DEFAULT_SANDBOX_TIMEOUT_S) * 1000,
          ...(a.image ? { image: a.image } : {}),
          ...(a.env ? { env: a.env } : {}),
          ...(a.ports ? { exposes: a.ports.map((guestPort) => ({ guestPort })) } : {}),
          ...(a.network ? { network: a.network } : {}),
          // The agent writes these rules: they may narrow its reach, never open the host's LAN.
          ...(a.network !== 'none'
            ? { egress: { allow: a.egressAllow ?? [], deny: a.egressDeny ?? [], privateRanges: 'never' as const } }
            : {}),
          ...(a.memoryMiB ? { memoryMiB: a.memoryMiB } : {}),
          ...(a.name ? { handle: a.name } : {}),
        });
        const ports = Object.fromEntries(inst.ports.map((p) => [String(p.guestPort), `${p.hostIp}:${p.hostPort}`]));
        return ok({ id: inst.id, name: inst.handle, state: inst.state, ports });
      },
    ),
  );

  server.registerTool(
    'run_command',
    {
      description: `Run a shell command (sh -c) in a sandbox and wait for it: exit code, stdout and stderr (each capped at ${MAX_OUTPUT_BYTES} bytes, marked when truncated). It is killed at the time limit.`,
      inputSchema: {
        sandbox,
        command: z.string().min(1).describe('shell command line, run with sh -c'),
        timeoutSeconds: z.number().int().min(1).max(3600).optional().describe(`time limit (default ${DEFAULT_COMMAND_TIMEOUT_S})`),
        cwd: z.string().optional().describe('working directory (created if missing)'),
        env: z.record(z.string(), z.string()).optional().describe('environment variables for this command only'),
      },
      annotations: { title: 'Run a command', readOnlyHint: false, destructiveHint: true, openWorldHint: true },
    },
    guarded(async (a: { sandbox: string; command: string; timeoutSeconds?: number; cwd?: string; env?: Record<string, string> }) => {
      const limitS = a.timeoutSeconds ?? DEFAULT_COMMAND_TIMEOUT_S;
      const out = { stdout: new Capped(), stderr: new Capped() };
      let exit: Extract<ExecEvent, { type: 'exit' }> | undefined;
      let timedOut = false;
      try {
        const req = { command: ['sh', '-c', a.command], ...(a.cwd ? { workdir: a.cwd } : {}), ...(a.env ? { env: a.env } : {}) };
        for await (const ev of api.exec(await scope.resolve(a.sandbox), req, AbortSignal.timeout(limitS * 1000))) {
          if (ev.type === 'output') out[ev.stream].push(Buffer.from(ev.data, 'base64'));
          else if (ev.type === 'exit') exit = ev;
        }
      } catch (err) {
        if (!AegisError.from(err).code.match(/^(TIMEOUT|CANCELLED)$/)) throw err;
        timedOut = true; // the daemon killed the command's process group when we gave up
      }
      const result = {
        exitCode: exit?.exitCode ?? null,
        signal: exit?.signal ?? null,
        timedOut,
        stdout: out.stdout.text(),
        stderr: out.stderr.text(),
        truncated: out.stdout.dropped + out.stderr.dropped > 0,
      };
      const head = timedOut
        ? `timed out after ${limitS} s (killed)`
        : `exit code ${result.exitCode ?? `null (signal ${result.signal ?? '?'})`}`;
      return ok(result, `${head}\n--- stdout ---\n${result.stdout}\n--- stderr ---\n${result.stderr}`);
    }),
  );

  server.registerTool(
    'read_file',
    {
      description: `Read a text file from a sandbox (at most ${MAX_FILE_BYTES} bytes are returned; the rest is marked truncated).`,
      inputSchema: { sandbox, path: absolutePath('absolute path of the file in the sandbox') },
      annotations: { title: 'Read a file', readOnlyHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string; path: string }) => {
      const { data, size } = await api.readFile(await scope.resolve(a.sandbox), a.path);
      const chunks: Buffer[] = [];
      let got = 0;
      for await (const c of data as AsyncIterable<Buffer>) {
        if (got < MAX_FILE_BYTES) chunks.push(c.subarray(0, MAX_FILE_BYTES - got));
        got += c.length;
      }
      const text = Buffer.concat(chunks).toString('utf8');
      const truncated = got > MAX_FILE_BYTES;
      return ok(
        { path: a.path, size, truncated, content: text },
        truncated ? `${text}\n[truncated: ${got - MAX_FILE_BYTES} more bytes]` : text,
      );
    }),
  );

  server.registerTool(
    'write_file',
    {
      description: 'Write a text file in a sandbox (replaced whole; parent directories are created).',
      inputSchema: {
        sandbox,
        path: absolutePath('absolute path of the file in the sandbox'),
        content: z.string().describe('the whole new content (text)'),
      },
      annotations: { title: 'Write a file', readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string; path: string; content: string }) => {
      const id = await scope.resolve(a.sandbox);
      const dir = path.posix.dirname(a.path);
      if (dir !== '/') await api.makeDirectory(id, dir, { parents: true });
      const st = await api.writeFile(id, a.path, a.content);
      return ok({ path: a.path, size: st.size });
    }),
  );

  server.registerTool(
    'list_files',
    {
      description: 'List a directory in a sandbox.',
      inputSchema: { sandbox, path: absolutePath('absolute path of the directory in the sandbox') },
      annotations: { title: 'List a directory', readOnlyHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string; path: string }) => {
      const entries = await api.listFiles(await scope.resolve(a.sandbox), a.path);
      return ok(
        { path: a.path, entries: entries.map((e) => ({ name: e.name, type: e.type, size: e.size })) },
        entries
          .map((e) => `${e.type === 'directory' ? 'd' : e.type === 'symlink' ? 'l' : '-'} ${String(e.size).padStart(10)} ${e.name}`)
          .join('\n'),
      );
    }),
  );

  server.registerTool(
    'logs',
    {
      description: "The sandbox's workload output and that of the commands run in it (last lines).",
      inputSchema: { sandbox, tail: z.number().int().min(1).max(10_000).optional().describe('last N entries (default 200)') },
      annotations: { title: 'Read logs', readOnlyHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string; tail?: number }) => {
      const out = new Capped();
      for await (const ev of api.logs(await scope.resolve(a.sandbox), { tail: a.tail ?? 200, execs: true })) {
        if (ev.type === 'output') out.push(Buffer.from(ev.data, 'base64'));
      }
      const text = out.text();
      return ok({ sandbox: a.sandbox, text, truncated: out.dropped > 0 }, text);
    }),
  );

  server.registerTool(
    'list_sandboxes',
    {
      description: scope.all
        ? 'Every instance of this Aegis daemon (the server runs with --all).'
        : 'Sandboxes created through MCP that still exist.',
      inputSchema: {},
      annotations: { title: 'List sandboxes', readOnlyHint: true, openWorldHint: false },
    },
    guarded(async () => {
      const list = await api.listInstances({ all: true, labels: scope.labels() });
      return ok({ sandboxes: list.map((i) => ({ id: i.id, name: i.handle, state: i.state, image: i.image ?? null })) });
    }),
  );

  server.registerTool(
    'stop_sandbox',
    {
      description:
        'Stop a sandbox: its VM ends, and a sandbox made by create_sandbox is then deleted with its files (to keep one for later, use pause_sandbox).',
      inputSchema: { sandbox },
      annotations: { title: 'Stop a sandbox', readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string }) => {
      const i = await api.stopInstance(await scope.resolve(a.sandbox), { timeoutMs: 3000 });
      return ok({ id: i.id, state: i.state });
    }),
  );

  server.registerTool(
    'pause_sandbox',
    {
      description:
        'Pause a sandbox to use it later: it is saved to disk and its VM ends (no CPU, no memory), its processes and files kept as they are; start_sandbox (or any command or file call) resumes it where it was. It is still deleted at its time limit.',
      inputSchema: { sandbox },
      annotations: { title: 'Pause a sandbox', readOnlyHint: false, destructiveHint: false, idempotentHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string }) => {
      const id = await scope.resolve(a.sandbox);
      const i = await api.getInstance(id);
      const after = i.state === 'hibernated' ? i : await api.hibernateInstance(id);
      return ok({ id: after.id, name: after.handle, state: after.state });
    }),
  );

  server.registerTool(
    'start_sandbox',
    {
      description:
        'Start a sandbox again: a paused one resumes where it was; a stopped one that was kept boots again with its files (its processes start afresh). One that runs is left as it is.',
      inputSchema: { sandbox },
      annotations: { title: 'Start a sandbox', readOnlyHint: false, destructiveHint: false, idempotentHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string }) => {
      const id = await scope.resolve(a.sandbox);
      const i = await api.getInstance(id);
      const after =
        i.state === 'paused' || i.state === 'hibernated'
          ? await api.resumeInstance(id)
          : i.state === 'running' || i.state === 'starting'
            ? i
            : await api.restartInstance(id);
      return ok({ id: after.id, name: after.handle, state: after.state });
    }),
  );

  server.registerTool(
    'snapshot_sandbox',
    {
      description:
        'Save a running sandbox whole (memory, processes, files) while it keeps running; create_sandbox with `snapshot` starts copies of it later, any number of times.',
      inputSchema: {
        sandbox,
        name: z
          .string()
          .regex(/^[a-zA-Z0-9][a-zA-Z0-9_.-]*$/, 'letters, digits, _ . -')
          .max(128)
          .optional()
          .describe('a name for the snapshot (default: generated)'),
      },
      annotations: {
        title: 'Snapshot a sandbox',
        readOnlyHint: false,
        destructiveHint: false,
        idempotentHint: false,
        openWorldHint: false,
      },
    },
    guarded(async (a: { sandbox: string; name?: string }) => {
      const s = await api.createSnapshot(await scope.resolve(a.sandbox), a.name !== undefined ? { name: a.name } : {});
      return ok({ snapshot: s.name, sizeBytes: s.sizeBytes });
    }),
  );

  server.registerTool(
    'fork_sandbox',
    {
      description:
        'Copy a running sandbox as it is now into new sandboxes that carry on from this point (processes, memory, files), each with its own files from then on; the original keeps running. Returns their ids.',
      inputSchema: { sandbox, count: z.number().int().min(1).max(8).optional().describe('how many copies (default 1)') },
      annotations: { title: 'Fork a sandbox', readOnlyHint: false, destructiveHint: false, idempotentHint: false, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string; count?: number }) => {
      const r = await api.forkInstance(await scope.resolve(a.sandbox), {
        count: a.count ?? 1,
        labels: { [MCP_LABEL]: '1' },
        autoRemove: true,
        timeoutMs: DEFAULT_SANDBOX_TIMEOUT_S * 1000,
      });
      return ok({ sandboxes: r.instances.map((i) => ({ id: i.id, name: i.handle, state: i.state })) });
    }),
  );

  server.registerTool(
    'delete_sandbox',
    {
      description: 'Stop and delete a sandbox and all its files.',
      inputSchema: { sandbox },
      annotations: { title: 'Delete a sandbox', readOnlyHint: false, destructiveHint: true, idempotentHint: true, openWorldHint: false },
    },
    guarded(async (a: { sandbox: string }) => {
      await api.deleteInstance(await scope.resolve(a.sandbox), { force: true });
      return ok({ deleted: a.sandbox });
    }),
  );

  await server.connect(new BoundedStdioTransport((v) => JSONRPCMessageSchema.safeParse(v)));
}

/** How this CLI starts as an MCP server: node, the CLI as an absolute path, `mcp`. */
function serverEntry(all: boolean): { command: string; args: string[]; env?: Record<string, string> } {
  const entry = process.argv[1] ? path.resolve(process.argv[1]) : 'aegis';
  const env = process.env['AEGIS_HOME'] ? { AEGIS_HOME: process.env['AEGIS_HOME'] } : undefined;
  return { command: process.execPath, args: ['--', entry, 'mcp', ...(all ? ['--all'] : [])], ...(env ? { env } : {}) };
}

interface McpClient {
  /** Its configuration file. */
  file: () => string;
  /** The key its servers live under, and how one entry looks. */
  key: 'mcpServers' | 'servers';
  entry: (all: boolean) => Record<string, unknown>;
}

/** Each client's file and format (VS Code's differs: `servers`, with `type`). */
const CLIENTS: Record<string, McpClient> = {
  claude: {
    file: () =>
      process.platform === 'darwin'
        ? path.join(os.homedir(), 'Library/Application Support/Claude/claude_desktop_config.json')
        : path.join(os.homedir(), '.config/Claude/claude_desktop_config.json'),
    key: 'mcpServers',
    entry: serverEntry,
  },
  'claude-code': { file: () => path.resolve('.mcp.json'), key: 'mcpServers', entry: serverEntry },
  cursor: { file: () => path.join(os.homedir(), '.cursor/mcp.json'), key: 'mcpServers', entry: serverEntry },
  vscode: { file: () => path.resolve('.vscode/mcp.json'), key: 'servers', entry: (all) => ({ type: 'stdio', ...serverEntry(all) }) },
  project: { file: () => path.resolve('.mcp.json'), key: 'mcpServers', entry: serverEntry },
};

function mcpClient(name: string): McpClient {
  const c = CLIENTS[name];
  if (!c) throw new AegisError('INVALID_ARGUMENT', `unknown MCP client "${name}": use ${Object.keys(CLIENTS).join(', ')}`);
  return c;
}

export function mcpCommand(): Command {
  const mcp = new Command('mcp')
    .description('serve the Model Context Protocol on stdio (tools for agents to use sandboxes)')
    .option('--all', 'let the agent use and delete every instance, not only the sandboxes MCP created')
    .action(async (o: { all?: boolean }) => {
      try {
        await serve(o);
      } catch (err) {
        fail(err);
      }
    });
  mcp
    .command('install')
    .description('print the MCP client configuration for aegis (or merge it into a client’s file with --write)')
    .option(
      '--client <name>',
      'claude (Claude Desktop), claude-code (./.mcp.json), cursor (~/.cursor/mcp.json), vscode (./.vscode/mcp.json) or project (./.mcp.json)',
      'project',
    )
    .option('--write', 'merge it into that client’s configuration file (other servers there are kept)')
    .option('--all', 'the server may use and delete every instance, not only the sandboxes MCP created')
    .action((o: { client: string; write?: boolean; all?: boolean }) => {
      try {
        const client = mcpClient(o.client);
        // `mcp install --all`: commander hands `--all` to the parent command, whose option it also is.
        const add = { [client.key]: { aegis: client.entry(o.all === true || mcp.opts<{ all?: boolean }>().all === true) } };
        const file = client.file();
        if (!o.write) {
          process.stdout.write(JSON.stringify(add, null, 2) + '\n');
          process.stderr.write(`aegis: this goes in ${file} (under "${client.key}"); --write merges it there\n`);
          return;
        }
        const current = existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as Record<string, unknown>) : {};
        const servers = (current[client.key] ?? {}) as Record<string, unknown>;
        const merged = { ...current, [client.key]: { ...servers, ...add[client.key] } };
        mkdirSync(path.dirname(file), { recursive: true });
        writeFileSync(file, JSON.stringify(merged, null, 2) + '\n');
        process.stdout.write(`${file}: aegis added\n`);
      } catch (err) {
        fail(
          err instanceof SyntaxError ? new AegisError('INVALID_ARGUMENT', `the existing configuration is not JSON: ${err.message}`) : err,
        );
      }
    });
  return mcp;
}
