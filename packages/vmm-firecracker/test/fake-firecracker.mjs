// A stand-in for the `firecracker` binary in unit tests (no KVM here): takes the same
// `--api-sock PATH --id ID` arguments, answers the API requests the backend sends, records each
// one as a JSON line in $FAKE_FC_LOG, and once "booted" plays the guest end of the vsock device
// (the CONNECT handshake, then an echo) on the uds_path it was given, relative to its cwd as
// Firecracker's is. Environment knobs:
//   FAKE_FC_FAULT="PUT /drives/scratch"  answer that request 400 with a fault_message
//   FAKE_FC_PANIC=1                       on InstanceStart, print a kernel panic and exit 0
//   FAKE_FC_IGNORE_CAD=1                  ignore SendCtrlAltDel (a guest without i8042)
//   FAKE_FC_CONSOLE="text"                on InstanceStart, the guest prints this line on its console
//                                         (which shares stdout with Firecracker's own log)
//   FAKE_FC_CONSOLE_FLOOD="BYTES:MS"      on InstanceStart, the guest floods its console: BYTES of numbered
//                                         lines over MS ms, then a "console flood done" line every 100 ms
// `--version` prints a version line as Firecracker does. `--no-api --config-file FILE` is the
// KVM test boot: it checks the file as Firecracker's parser would, records
// {args, cwd, pid, config} in $FAKE_FC_LOG and a line per run in $FAKE_FC_RUNS, then plays the
// outcome named by FAKE_FC_BOOT:
//   panic       the guest kernel boots, panics at the root mount, the reset ends it (status 0)
//   fail        Firecracker cannot create the VM: an ERROR log line, `Error: ...` on stderr, status 1
//   vcpu-error  the vCPU fails (as on a KVM that cannot run guests) and the process lingers
//   hang        prints nothing and never exits
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';

const args = process.argv.slice(2);
const arg = (flag) => {
  const i = args.indexOf(flag);
  return i >= 0 ? args[i + 1] : undefined;
};
const apiSock = arg('--api-sock');
const id = arg('--id') ?? 'anonymous-instance';
const log = process.env.FAKE_FC_LOG;
let state = 'Not started';

const record = (entry) => {
  if (log) fs.appendFileSync(log, JSON.stringify(entry) + '\n');
};

// Firecracker's log line format: `<time> [<id>:<thread>:<LEVEL>] message` (level with --show-level).
const fcLog = (thread, level, message) => {
  const lvl = args.includes('--show-level') ? `:${level}` : '';
  process.stdout.write(`${new Date().toISOString()} [${id}:${thread}${lvl}] ${message}\n`);
};

if (args.includes('--version')) {
  process.stdout.write('Firecracker v1.99.0-fake\n\n');
  process.exit(0);
}

if (args.includes('--no-api')) {
  bootFromConfigFile();
} else {
  serveApi();
}

function failStart(message, code = 1) {
  fcLog('main', 'ERROR', message);
  process.stderr.write(`Error: RunWithoutApiError(${JSON.stringify(message)})\n`);
  fcLog('main', 'ERROR', `Firecracker exiting with error. exit_code=${code}`);
  process.exit(code);
}

function bootFromConfigFile() {
  const file = arg('--config-file');
  if (!file) failStart('Arguments parsing error: --no-api requires --config-file', 153);
  const config = JSON.parse(fs.readFileSync(file, 'utf8'));
  record({ args, cwd: process.cwd(), pid: process.pid, config });
  if (process.env.FAKE_FC_RUNS) fs.appendFileSync(process.env.FAKE_FC_RUNS, 'run\n');
  fcLog('main', 'INFO', 'Running Firecracker v1.99.0-fake');
  // What Firecracker's serde parser insists on.
  if (!Array.isArray(config.drives)) failStart('Configuration for VMM from one single json failed: Invalid JSON: missing field `drives`');
  const kernel = config['boot-source']?.kernel_image_path;
  if (!kernel || !fs.existsSync(kernel))
    failStart('Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)');
  const mode = process.env.FAKE_FC_BOOT ?? 'panic';
  if (mode === 'hang') {
    setInterval(() => undefined, 1000);
  } else if (mode === 'fail') {
    failStart('Could not Start MicroVM from one single json: Cannot create VM: fake: the VM could not be created');
  } else if (mode === 'vcpu-error') {
    fcLog('main', 'INFO', 'Successfully started microvm that was configured from one single json');
    fcLog('fc_vcpu 0', 'ERROR', 'Failure during vcpu run: Invalid argument (os error 22)');
    setInterval(() => undefined, 1000);
  } else {
    fcLog('main', 'INFO', 'Successfully started microvm that was configured from one single json');
    const serial = [
      'Linux version 6.1.0-fake (gcc) #1 SMP',
      'Command line: ' + config['boot-source'].boot_args,
      'VFS: Cannot open root device "" or unknown-block(0,0): error -6',
      'Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)',
    ];
    // The guest console writes CRLF, in pieces that need not end at a line.
    process.stdout.write(serial.join('\r\n').slice(0, 40));
    setTimeout(() => {
      process.stdout.write(serial.join('\r\n').slice(40) + '\r\n');
      fcLog('main', 'INFO', 'Firecracker exiting successfully. exit_code=0');
      process.exit(0);
    }, 20);
  }
}

function serveVsock(udsPath) {
  const server = net.createServer((socket) => {
    let buf = '';
    const onData = (chunk) => {
      buf += chunk.toString('latin1');
      const nl = buf.indexOf('\n');
      if (nl < 0) return;
      socket.removeListener('data', onData);
      const m = /^CONNECT (\d+)$/.exec(buf.slice(0, nl));
      // Like Firecracker: nothing listening on the port (not booted yet) closes the connection.
      if (!m || state !== 'Running') return socket.destroy();
      // The greeting shares a chunk with the OK line, as a fast guest's first bytes can.
      socket.write(`OK 1073741824\nhello port ${m[1]}\n`);
      socket.pipe(socket);
    };
    socket.on('data', onData);
    socket.on('error', () => undefined);
  });
  server.listen(udsPath);
}

function serveApi() {
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
      const text = Buffer.concat(chunks).toString('utf8');
      const body = text ? JSON.parse(text) : undefined;
      const key = `${req.method} ${req.url}`;
      if (req.method !== 'GET') record({ method: req.method, path: req.url, body });
      const reply = (status, json) => {
        res.writeHead(status, json ? { 'Content-Type': 'application/json' } : {});
        res.end(json ? JSON.stringify(json) : undefined);
      };
      if (process.env.FAKE_FC_FAULT === key) return reply(400, { fault_message: `fake fault on ${key}` });
      if (key === 'GET /') return reply(200, { id, state, vmm_version: '1.99.0-fake', app_name: 'Firecracker' });
      if (key === 'PUT /vsock') serveVsock(body.uds_path);
      if (key === 'PUT /snapshot/load') {
        serveVsock('vsock.sock');
        state = body.resume_vm ? 'Running' : 'Paused';
      }
      if (key === 'PATCH /vm') state = body.state === 'Paused' ? 'Paused' : 'Running';
      if (key === 'PUT /snapshot/create') {
        fs.writeFileSync(body.snapshot_path, 'state');
        fs.writeFileSync(body.mem_file_path, 'memory');
      }
      if (key === 'PUT /actions' && body.action_type === 'InstanceStart') {
        state = 'Running';
        console.log('Linux version 6.1.0-fake');
        if (process.env.FAKE_FC_CONSOLE) console.log(process.env.FAKE_FC_CONSOLE);
        if (process.env.FAKE_FC_CONSOLE_FLOOD) floodConsole(process.env.FAKE_FC_CONSOLE_FLOOD);
        if (process.env.FAKE_FC_PANIC) {
          console.log('Kernel panic - not syncing: fake');
          setTimeout(() => process.exit(0), 20);
        }
      }
      if (key === 'PUT /actions' && body.action_type === 'SendCtrlAltDel' && !process.env.FAKE_FC_IGNORE_CAD) {
        console.log(`[${id}:main] Firecracker exiting successfully. exit_code=0`);
        setTimeout(() => process.exit(0), 20);
      }
      reply(204);
    });
  });
  server.listen(apiSock, () => console.log(`[${id}:main] Running Firecracker v1.99.0-fake`));
}

// A guest printing to /dev/console as fast as it can: fixed-size numbered lines, in 10 ms bursts.
function floodConsole(spec) {
  const [bytes, ms] = spec.split(':').map(Number);
  const line = (n) => `flood line ${String(n).padStart(8, '0')} ${'x'.repeat(100)}\n`;
  const lines = Math.ceil(bytes / line(0).length);
  const ticks = Math.max(1, Math.round(ms / 10));
  let n = 0;
  let tick = 0;
  const timer = setInterval(() => {
    tick += 1;
    const upTo = Math.min(lines, Math.round((lines * tick) / ticks));
    let out = '';
    while (n < upTo) out += line(n++);
    process.stdout.write(out);
    if (n < lines) return;
    clearInterval(timer);
    setInterval(() => process.stdout.write(`console flood done after ${n} lines\n`), 100);
  }, 10);
}
