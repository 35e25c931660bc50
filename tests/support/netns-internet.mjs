// The "internet" of tests/support/netns-world.mjs, in a network namespace of its own (run as
// `unshare --net node netns-internet.mjs`). The world moves one end of its veth pair in here;
// this side holds every "remote" address, so none of them is an address of the daemon's host:
//   192.0.2.1        a public server (TEST-NET-1): HTTP :8081 "outside-ok", HTTPS :8443 (a
//                    certificate for example.test and other.test from a test CA), DNS :53
//   198.51.100.7     a second public server (TEST-NET-2): HTTP :8081 "second-ok"
//   169.254.169.254  a cloud metadata service: HTTP :8081 "metadata-secret"
//   10.99.0.5        a LAN host: HTTP :8081 "lan-secret"
// DNS: example.test and other.test -> 192.0.2.1, second.test -> 198.51.100.7, rebind.test ->
// 10.99.0.5 (a public name answering with a private address), meta.test -> 169.254.169.254,
// lan.test -> 10.99.0.5; NXDOMAIN otherwise. It prints "ready" once everything listens.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import dgram from 'node:dgram';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';

const [link, certDir] = process.argv.slice(2);
const sh = (...args) => execFileSync(args[0], args.slice(1), { stdio: 'inherit' });

const ADDRESSES = {
  '192.0.2.1': 'outside-ok',
  '198.51.100.7': 'second-ok',
  '169.254.169.254': 'metadata-secret',
  '10.99.0.5': 'lan-secret',
};
const NAMES = {
  'example.test': '192.0.2.1',
  'other.test': '192.0.2.1',
  'second.test': '198.51.100.7',
  'rebind.test': '10.99.0.5',
  'meta.test': '169.254.169.254',
  'lan.test': '10.99.0.5',
};

// The world moves our link in after we start.
for (let i = 0; ; i++) {
  try {
    execFileSync('ip', ['link', 'show', link], { stdio: 'ignore' });
    break;
  } catch {
    if (i > 500) throw new Error(`${link} never arrived`);
    await new Promise((r) => setTimeout(r, 10));
  }
}
sh('ip', 'link', 'set', 'lo', 'up');
sh('ip', 'addr', 'add', '192.0.2.1/24', 'dev', link);
for (const a of Object.keys(ADDRESSES).filter((a) => a !== '192.0.2.1')) sh('ip', 'addr', 'add', `${a}/32`, 'dev', link);
sh('ip', 'link', 'set', link, 'up');
sh('ip', 'route', 'add', 'default', 'dev', link);

const listen = (server, port, host) => new Promise((resolve) => server.listen(port, host, resolve));
const answer = (req, res) => {
  const body = ADDRESSES[req.socket.localAddress.replace(/^::ffff:/, '')] ?? 'unknown';
  // What a secret broker rewrites, as digests: tests see what arrived without the guest seeing a value.
  const sha = (s) => createHash('sha256').update(s).digest('hex');
  res.setHeader('x-seen-authorization-sha256', sha(req.headers['authorization'] ?? ''));
  res.setHeader('x-seen-url-sha256', sha(req.url ?? ''));
  res.end(`${body}\n`);
};
await listen(http.createServer(answer), 8081, '0.0.0.0');
if (certDir) {
  const tls = { key: readFileSync(`${certDir}/server.key`), cert: readFileSync(`${certDir}/server.crt`) };
  await listen(https.createServer(tls, answer), 8443, '192.0.2.1');
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
  const address = NAMES[name];
  const header = Buffer.alloc(12);
  query.copy(header, 0, 0, 2); // id
  header.writeUInt16BE(address ? 0x8180 : 0x8183, 2); // response, recursion available; NXDOMAIN
  header.writeUInt16BE(1, 4);
  header.writeUInt16BE(address && qtype === 1 ? 1 : 0, 6);
  const parts = [header, query.subarray(12, qEnd)];
  if (address && qtype === 1) {
    const rr = Buffer.alloc(16);
    rr.writeUInt16BE(0xc00c, 0); // the question's name
    rr.writeUInt16BE(1, 2); // A
    rr.writeUInt16BE(1, 4); // IN
    rr.writeUInt32BE(60, 6);
    rr.writeUInt16BE(4, 10);
    address.split('.').forEach((b, i) => rr.writeUInt8(Number(b), 12 + i));
    parts.push(rr);
  }
  return Buffer.concat(parts);
}
const dns = dgram.createSocket('udp4');
dns.on('message', (msg, rinfo) => {
  try {
    dns.send(dnsAnswer(msg), rinfo.port, rinfo.address);
  } catch {
    // a malformed query gets no answer
  }
});
await new Promise((resolve) => dns.bind(53, '192.0.2.1', resolve));
process.stdout.write('ready\n');
// Lives as long as the world that started it (its stdin closes with it).
process.stdin.resume();
process.stdin.on('end', () => process.exit(0));
