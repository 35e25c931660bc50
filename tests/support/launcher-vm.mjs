// The "VM" of the launcher test backend (launcher-vmm.ts): one process per VM, as libkrun's
// launcher is (krun_start_enter takes over its process). It has no guest kernel: it listens on
// the unix sockets libkrun's krun_add_vsock_port2(listen) would give the host for vsock ports
// 1024 (agent) and 1025 (data), one host connection at a time, each accepted again after the last
// closed (aegis-init's rule), and serves a scripted harness on the agent port:
//   health    -> {version: 1, uptimeMs, workload}
//   run       -> {pid, startedAtMs}; a workload `echo ARGS...` prints ARGS on stdout and exits 0,
//                any other runs until signalled
//   signal    -> {} and the workload exits on that signal
//   shutdown  -> {} and then the process exits 0 (the guest powered off)
//   any other -> JSON-RPC "method not found"
// Arguments: --id ID --state-dir DIR. SIGTERM ends it (the graceful stop of a launcher).
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';

const args = process.argv.slice(2);
const arg = (flag) => {
  const i = args.indexOf(flag);
  return i >= 0 ? args[i + 1] : undefined;
};
const stateDir = arg('--state-dir');
if (!stateDir || !arg('--id')) {
  process.stderr.write('usage: launcher-vm.mjs --id ID --state-dir DIR\n');
  process.exit(2);
}
const started = Date.now();
/** The workload: what `health` reports and `signal` ends. */
let workload = null;

/** One listener per vsock port; a second host connection waits until the first has closed. */
function listen(name, serve) {
  const file = path.join(stateDir, name);
  fs.rmSync(file, { force: true });
  fs.rmSync(path.join(stateDir, 'running'), { force: true });
  let busy = false;
  const server = net.createServer((sock) => {
    if (busy) {
      sock.destroy();
      return;
    }
    busy = true;
    sock.once('close', () => (busy = false));
    sock.on('error', () => undefined);
    serve(sock);
  });
  server.listen(file);
  return server;
}

function serveAgent(sock) {
  let buf = '';
  const send = (msg) => sock.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n');
  send({ method: 'ready', params: { version: 1 } });
  sock.on('data', (chunk) => {
    buf += chunk.toString('utf8');
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      if (!line.trim()) continue;
      let req;
      try {
        req = JSON.parse(line);
      } catch {
        continue;
      }
      if (req.id === undefined) continue; // a notification or an answer: nothing to say
      if (req.method === 'health') {
        const w = workload && { pid: workload.pid, running: workload.running };
        send({ id: req.id, result: { version: 1, uptimeMs: Date.now() - started, workload: w } });
      } else if (req.method === 'run') {
        workload = { pid: 2, running: true };
        send({ id: req.id, result: { pid: 2, startedAtMs: Date.now() } });
        const [cmd, ...rest] = req.params?.command ?? [];
        if (cmd === 'echo') {
          const out = Buffer.from(`${rest.join(' ')}\n`);
          setTimeout(() => {
            send({ method: 'output', params: { stream: 'stdout', data: out.toString('base64') } });
            workload.running = false;
            send({ method: 'exit', params: { exitCode: 0, signal: null, bytes: { stdout: out.length, stderr: 0 } } });
          }, 20);
        }
      } else if (req.method === 'signal') {
        send({ id: req.id, result: {} });
        if (workload?.running && req.params?.execId === undefined) {
          workload.running = false;
          send({ method: 'exit', params: { exitCode: null, signal: req.params?.signal ?? 'SIGTERM', bytes: { stdout: 0, stderr: 0 } } });
        }
      } else if (req.method === 'shutdown') {
        if (workload?.running) {
          workload.running = false;
          send({ method: 'exit', params: { exitCode: null, signal: 'SIGTERM', bytes: { stdout: 0, stderr: 0 } } });
        }
        send({ id: req.id, result: {} });
        setTimeout(() => process.exit(0), 50);
      } else send({ id: req.id, error: { code: -32601, message: `method not found: ${req.method}` } });
    }
  });
}

const servers = [
  listen('agent.sock', serveAgent),
  // The data plane: no frames are ever sent (no --expose here); the connection is only held.
  listen('data.sock', () => undefined),
];
// A socket file exists from bind(), a moment before listen(): the host waits for this instead.
await Promise.all(servers.map((s) => new Promise((resolve) => (s.listening ? resolve() : s.once('listening', resolve)))));
fs.writeFileSync(path.join(stateDir, 'running'), `${process.pid}\n`);
process.stdout.write(`launcher ${arg('--id')}: running (pid ${process.pid})\n`);
