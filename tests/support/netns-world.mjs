// A small private "internet" for network tests, and a daemon living in it.
//
// Run as `unshare --net --mount node netns-world.mjs <daemon command...>`. In the daemon's new
// network namespace it makes a veth pair: aegis-w0 holds 192.0.2.2 (the host's own address)
// and carries the default route; aegis-w1 goes to a second namespace, the internet
// (netns-internet.mjs: a public server, a cloud metadata address, a LAN host, DNS), so a
// guest's traffic never leaves the machine, whatever it is sent to, and every remote address
// is remote. Here (the host) it serves:
//   - HTTP on 127.0.0.1:8082 answering "loopback-secret" (a service on the host's loopback),
//   - HTTP on 0.0.0.0:8084 answering "host-secret" (a host service on every host address),
// points /etc/resolv.conf (in its own mount namespace) at the internet's DNS server, makes a
// test CA and a certificate for the internet's HTTPS server (the daemon trusts the CA through
// AEGIS_EXTRA_CA_CERTS), then runs the daemon command as its child and exits with it (starting
// it again after a SIGKILL, as after a crash), passing on SIGTERM and SIGINT.
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const sh = (...args) => execFileSync(args[0], args.slice(1), { stdio: ['ignore', 'ignore', 'inherit'] });

// The test CA and the internet's certificate (example.test, other.test).
const certs = mkdtempSync(path.join(os.tmpdir(), 'aegis-world-'));
const ssl = (...args) => execFileSync('openssl', args, { stdio: ['ignore', 'ignore', 'pipe'] });
ssl(
  'req',
  '-x509',
  '-newkey',
  'ec',
  '-pkeyopt',
  'ec_paramgen_curve:P-256',
  '-nodes',
  '-days',
  '2',
  '-subj',
  '/CN=Aegis test CA',
  '-keyout',
  `${certs}/ca.key`,
  '-out',
  `${certs}/ca.crt`,
);
ssl(
  'req',
  '-newkey',
  'ec',
  '-pkeyopt',
  'ec_paramgen_curve:P-256',
  '-nodes',
  '-subj',
  '/CN=example.test',
  '-keyout',
  `${certs}/server.key`,
  '-out',
  `${certs}/server.csr`,
);
writeFileSync(`${certs}/ext.cnf`, 'subjectAltName=DNS:example.test,DNS:other.test\n');
ssl(
  'x509',
  '-req',
  '-in',
  `${certs}/server.csr`,
  '-CA',
  `${certs}/ca.crt`,
  '-CAkey',
  `${certs}/ca.key`,
  '-CAcreateserial',
  '-days',
  '2',
  '-extfile',
  `${certs}/ext.cnf`,
  '-out',
  `${certs}/server.crt`,
);

const internet = spawn('unshare', ['--net', process.execPath, path.join(here, 'netns-internet.mjs'), 'aegis-w1', certs], {
  stdio: ['pipe', 'pipe', 'inherit'],
});
sh('ip', 'link', 'set', 'lo', 'up');
sh('ip', 'link', 'add', 'aegis-w0', 'type', 'veth', 'peer', 'name', 'aegis-w1');
sh('ip', 'link', 'set', 'aegis-w1', 'netns', String(internet.pid));
sh('ip', 'addr', 'add', '192.0.2.2/24', 'dev', 'aegis-w0');
sh('ip', 'link', 'set', 'aegis-w0', 'up');
sh('ip', 'route', 'add', 'default', 'dev', 'aegis-w0');
await new Promise((resolve, reject) => {
  let out = '';
  internet.stdout.on('data', (d) => {
    out += d;
    if (out.includes('ready')) resolve();
  });
  internet.once('exit', (code) => reject(new Error(`the test internet exited (${code})`)));
});
const resolv = path.join(certs, 'resolv.conf');
writeFileSync(resolv, 'nameserver 192.0.2.1\n');
sh('mount', '--bind', resolv, '/etc/resolv.conf');

function serve(host, port, body) {
  return new Promise((resolve) => {
    http
      .createServer((_req, res) => res.end(body))
      .listen(port, host, resolve)
      .unref();
  });
}
await serve('127.0.0.1', 8082, 'loopback-secret\n');
await serve('0.0.0.0', 8084, 'host-secret\n');

// A daemon SIGKILLed (a crash, as a test makes one) is started again in the same world; any
// other end of it ends the world.
const [cmd, ...args] = process.argv.slice(2);
let child;
let stopping = false;
function run() {
  child = spawn(cmd, args, {
    stdio: 'inherit',
    env: { ...process.env, AEGIS_WORLD_CERTS: certs, AEGIS_EXTRA_CA_CERTS: `${certs}/ca.crt` },
  });
  child.on('exit', (code, sig) => {
    if (sig === 'SIGKILL' && !stopping) return run();
    internet.kill();
    process.exit(code ?? (sig ? 1 : 0));
  });
}
for (const sig of ['SIGTERM', 'SIGINT'])
  process.on(sig, () => {
    stopping = true;
    child.kill(sig);
  });
run();
