/**
 * Egress rules as the user writes them (`--egress-allow PATTERN`, `--egress-deny PATTERN`) and
 * the address ranges refused by default. A PATTERN is a name (`pypi.org`), a suffix
 * (`*.pythonhosted.org`, which also matches `pythonhosted.org`), an IP address or a CIDR
 * (`10.0.0.5`, `10.0.0.0/8`, `fd00::/8`), each with an optional `:PORT` (`[fd00::1]:443` for
 * an IPv6 address with a port).
 */
import net from 'node:net';
import os from 'node:os';
import { AegisError } from '@aegis/protocol';

export type RuleTarget =
  | { kind: 'name'; name: string }
  | { kind: 'suffix'; suffix: string }
  | { kind: 'address'; network: string; prefix: number; family: 'ipv4' | 'ipv6' };

export interface Rule {
  /** As the user wrote it (shown back in `egress show`). */
  text: string;
  target: RuleTarget;
  port: number | undefined;
}

/** Rules per instance and per list: far more than anyone writes by hand, few enough to scan. */
export const MAX_RULES = 256;
const NAME_RE = /^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

function bad(text: string, why: string): never {
  throw new AegisError(
    'INVALID_ARGUMENT',
    `egress pattern ${JSON.stringify(text)}: ${why} (a name, *.suffix, IP or CIDR, with an optional :PORT)`,
  );
}

function splitPort(text: string): { host: string; port: number | undefined } {
  let host = text;
  let portText: string | undefined;
  const bracket = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (bracket) {
    host = bracket[1] as string;
    portText = bracket[2];
  } else if ((text.match(/:/g) ?? []).length === 1) {
    const i = text.indexOf(':');
    host = text.slice(0, i);
    portText = text.slice(i + 1);
  }
  if (portText === undefined) return { host, port: undefined };
  if (!/^\d{1,5}$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535)
    bad(text, `port ${JSON.stringify(portText)} is not 1-65535`);
  return { host, port: Number(portText) };
}

export function parseRule(text: string): Rule {
  if (typeof text !== 'string' || text.length === 0 || text.length > 300) bad(String(text), 'empty or too long');
  const { host, port } = splitPort(text.trim().toLowerCase());
  const slash = host.indexOf('/');
  const addr = slash >= 0 ? host.slice(0, slash) : host;
  const family = net.isIPv4(addr) ? 'ipv4' : net.isIPv6(addr) ? 'ipv6' : undefined;
  if (family) {
    const max = family === 'ipv4' ? 32 : 128;
    const prefixText = slash >= 0 ? host.slice(slash + 1) : String(max);
    if (!/^\d{1,3}$/.test(prefixText) || Number(prefixText) > max) bad(text, `prefix /${prefixText} is not 0-${max}`);
    return { text, target: { kind: 'address', network: addr, prefix: Number(prefixText), family }, port };
  }
  if (slash >= 0) bad(text, `${JSON.stringify(addr)} is not an IP address`);
  if (host.startsWith('*.')) {
    const suffix = host.slice(2);
    if (!NAME_RE.test(suffix)) bad(text, `${JSON.stringify(suffix)} is not a DNS name`);
    return { text, target: { kind: 'suffix', suffix }, port };
  }
  const name = host.endsWith('.') ? host.slice(0, -1) : host;
  if (!NAME_RE.test(name)) bad(text, `${JSON.stringify(host)} is not a DNS name`);
  return { text, target: { kind: 'name', name }, port };
}

export function parseRules(texts: readonly string[], list: 'allow' | 'deny'): Rule[] {
  if (texts.length > MAX_RULES)
    throw new AegisError('INVALID_ARGUMENT', `at most ${MAX_RULES} egress ${list} patterns per instance (${texts.length} given)`);
  return texts.map(parseRule);
}

export function nameMatches(rule: Rule, name: string, port?: number): boolean {
  if (port !== undefined && rule.port !== undefined && rule.port !== port) return false;
  const n = name.toLowerCase().replace(/\.$/, '');
  const t = rule.target;
  if (t.kind === 'name') return n === t.name;
  if (t.kind === 'suffix') return n === t.suffix || n.endsWith(`.${t.suffix}`);
  return false;
}

/** One BlockList per address rule, made on first use: every connection asks. */
const ruleLists = new WeakMap<Rule, net.BlockList>();

export function addressMatches(rule: Rule, address: string, port?: number): boolean {
  if (port !== undefined && rule.port !== undefined && rule.port !== port) return false;
  const t = rule.target;
  if (t.kind !== 'address') return false;
  const family = net.isIPv4(address) ? 'ipv4' : 'ipv6';
  if (family !== t.family) return false;
  let list = ruleLists.get(rule);
  if (!list) {
    list = subnet(t.network, t.prefix, t.family);
    ruleLists.set(rule, list);
  }
  return list.check(address, family);
}

function subnet(network: string, prefix: number, family: 'ipv4' | 'ipv6'): net.BlockList {
  const list = new net.BlockList();
  list.addSubnet(network, prefix, family);
  return list;
}

/** Ranges no guest reaches unless the user names an address in them (or a name that answers with one). */
const REFUSED_RANGES: ReadonlyArray<[string, number, 'ipv4' | 'ipv6', string]> = [
  ['0.0.0.0', 8, 'ipv4', '"this network" (0.0.0.0/8)'],
  ['127.0.0.0', 8, 'ipv4', 'loopback'],
  ['10.0.0.0', 8, 'ipv4', 'private (RFC 1918)'],
  ['172.16.0.0', 12, 'ipv4', 'private (RFC 1918)'],
  ['192.168.0.0', 16, 'ipv4', 'private (RFC 1918)'],
  ['100.64.0.0', 10, 'ipv4', 'carrier-grade NAT (100.64/10)'],
  ['169.254.0.0', 16, 'ipv4', 'link-local (cloud metadata lives here)'],
  ['224.0.0.0', 4, 'ipv4', 'multicast'],
  ['240.0.0.0', 4, 'ipv4', 'reserved (240/4, broadcast)'],
  ['::', 128, 'ipv6', 'unspecified'],
  ['::1', 128, 'ipv6', 'loopback'],
  ['fe80::', 10, 'ipv6', 'link-local'],
  ['fc00::', 7, 'ipv6', 'unique local (fc00::/7)'],
  ['ff00::', 8, 'ipv6', 'multicast'],
];
const REFUSED = REFUSED_RANGES.map(([network, prefix, family, why]) => ({ list: subnet(network, prefix, family), prefix, family, why }));

/**
 * Why `address` is refused by default (a private, loopback, link-local... range, or one of the
 * host's own addresses: a service bound to 0.0.0.0 there must not answer the guest), or
 * undefined for a public address.
 */
export function refusedByDefault(address: string): string | undefined {
  const family = net.isIPv4(address) ? 'ipv4' : net.isIPv6(address) ? 'ipv6' : undefined;
  if (!family) return 'not an IP address';
  for (const r of REFUSED) if (r.family === family && r.list.check(address, family)) return r.why;
  // IPv4-mapped IPv6 (::ffff:a.b.c.d) is the IPv4 address in disguise.
  const mapped = /^::ffff:(\d+\.\d+\.\d+\.\d+)$/i.exec(address);
  if (mapped) return refusedByDefault(mapped[1] as string);
  if (hostAddresses().has(address)) return "one of the host's own addresses";
  return undefined;
}

let hostCache: { at: number; set: Set<string> } | undefined;
/** The host's interface addresses, looked up again every few seconds (interfaces come and go). */
function hostAddresses(): Set<string> {
  const now = Date.now();
  if (!hostCache || now - hostCache.at > 5_000) {
    const set = new Set<string>();
    for (const list of Object.values(os.networkInterfaces())) for (const a of list ?? []) set.add(a.address.replace(/%.*$/, ''));
    hostCache = { at: now, set };
  }
  return hostCache.set;
}

/**
 * Whether an address rule names `address` explicitly: the rule's network lies inside the
 * refused range the address is in, so `--egress-allow 10.0.0.5` unlocks that host while
 * `--egress-allow 0.0.0.0/0` (the whole internet) does not unlock the LAN.
 */
export function namesExplicitly(rule: Rule, address: string): boolean {
  const t = rule.target;
  if (t.kind !== 'address' || !addressMatches(rule, address)) return false;
  const reason = refusedByDefault(address);
  if (reason === undefined) return true;
  if (reason === "one of the host's own addresses") return t.prefix === (t.family === 'ipv4' ? 32 : 128);
  return refusedByDefault(t.network) === reason && t.prefix >= smallestRefusedPrefix(t.network, t.family);
}

function smallestRefusedPrefix(address: string, family: 'ipv4' | 'ipv6'): number {
  for (const r of REFUSED) if (r.family === family && r.list.check(address, family)) return r.prefix;
  return family === 'ipv4' ? 32 : 128;
}
