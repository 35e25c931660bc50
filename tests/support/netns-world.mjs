// A small private "internet" for network tests, and a daemon living in it.
//
// Run as `unshare --net --mount node netns-world.mjs <daemon command...>`: in the new network
// namespace it makes a veth pair whose one end holds 192.0.2.1 (TEST-NET-1) and carries the
// default route, so a guest's traffic never leaves the machine, whatever it is sent to. It
// serves:
//   - HTTP on 0.0.0.0:8081 answering "outside-ok" (a server "on the internet"),
//   - HTTP on 127.0.0.1:8082 answering "loopback-secret" (a service on the host's loopback
//     that guests must never reach),
//   - DNS on 192.0.2.1:53 answering example.test → 192.0.2.1 (and NXDOMAIN otherwise),
// points /etc/resolv.conf (in its own mount namespace) at that DNS server, then runs the
// daemon command as its child and exits with it, passing on SIGTERM and SIGINT.
import { execFileSync, spawn } from 'node:child_process';
import dgram from 'node:dgram';
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';

const OUTSIDE = '192.0.2.1';

function sh(...args) {
  execFileSync(args[0], args.slice(1), { stdio: 'inherit' });
}

sh('ip', 'link', 'set', 'lo', 'up');
sh('ip', 'link', 'add', 'aegis-w0', 'type', 'veth', 'peer', 'name', 'aegis-w1');
sh('ip', 'addr', 'add', `${OUTSIDE}/24`, 'dev', 'aegis-w0');
sh('ip', 'link', 'set', 'aegis-w0', 'up');
sh('ip', 'link', 'set', 'aegis-w1', 'up');
sh('ip', 'route', 'add', 'default', 'dev', 'aegis-w0');
const resolv = path.join(os.tmpdir(), `aegis-world-resolv-${process.pid}.conf`);
writeFileSync(resolv, `nameserver ${OUTSIDE}\n`);
sh('mount', '--bind', resolv, '/etc/resolv.conf');

function serve(host, port, body) {
  return new Promise((resolve) => {
    http
      .createServer((_req, res) => res.end(body))
      .listen(port, host, resolve)
      .unref();
  });
}

function dnsAnswer(query) {
  // Header (12 bytes), then one question: labels, type, class.
  let off = 12;
  const labels = [];
  while (off < query.length && query[off] !== 0) {
    const len = query[off];
    labels.push(query.subarray(off + 1, off + 1 + len).toString('latin1'));
    off += 1 + len;
  }
  const qEnd = off + 5;
  const name = labels.join('.').toLowerCase();
  const qtype = query.readUInt16BE(off + 1);
  const known = name === 'example.test';
  const header = Buffer.alloc(12);
  query.copy(header, 0, 0, 2); // id
  header.writeUInt16BE(known ? 0x8180 : 0x8183, 2); // response, recursion available; NXDOMAIN
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(known && qtype === 1 ? 1 : 0, 6);
  const parts = [header, query.subarray(12, qEnd)];
  if (known && qtype === 1) {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0); // the question's name
    rr.writeUInt16BE(1, 2); // A
    rr.writeUInt16BE(1, 4); // IN
    rr.writeUInt32BE(60, 6);
    rr.writeUInt16BE(4, 10);
    OUTSIDE.split('.').forEach((b, i) => rr.writeUInt8(Number(b), 12 + i));
    parts.push(rr);
  }
  return Buffer.concat(parts);
}

await serve('0.0.0.0', 8081, 'outside-ok\n');
await serve('127.0.0.1', 8082, 'loopback-secret\n');
const dns = dgram.createSocket('udp4');
dns.on('message', (msg, rinfo) => {
  try {
    dns.send(dnsAnswer(msg), rinfo.port, rinfo.address);
  } catch {
    // a malformed query gets no answer
  }
});
await new Promise((resolve) => dns.bind(53, OUTSIDE, resolve));
dns.unref();

const [cmd, ...args] = process.argv.slice(2);
const child = spawn(cmd, args, { stdio: 'inherit' });
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => child.kill(sig));
child.on('exit', (code, sig) => process.exit(code ?? (sig ? 1 : 0)));
