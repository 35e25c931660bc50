/**
 * One instance's egress: its policy (allow and deny rules, changed while it runs), the names its
 * DNS answers pinned to addresses, and a bounded audit log with per-destination counters. It is
 * the data channel's EgressHandler: every DNS query and every connection of the guest comes
 * here, from the untrusted side, and leaves the host only if the policy says so.
 *
 * Decisions (docs/design.md, "Egress"):
 * - deny rules win over everything; a denied name answers NXDOMAIN, a denied address is refused;
 * - with no allow rule, public addresses are allowed and the ranges of `refusedByDefault` are
 *   not, unless an allow rule names the address (or a name the user allowed answers with it);
 * - with allow rules, only what they match: an address rule, or an address that came from an
 *   allowed name's DNS answer (pinned for its TTL); the TLS server name or HTTP Host of such a
 *   connection must then be an allowed name too;
 * - UDP is DNS only (aegis-init rejects the rest in the guest; nothing else is carried).
 */
import { promises as dnsp } from 'node:dns';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import * as dnsPacket from 'dns-packet';
import type { ApiSchemas } from '@aegis/protocol/api';
import { duplexPair } from '../ports/duplex-pair.js';
import type { EgressConnection, EgressHandler, FirstBytesVerdict, GuestDestination } from '../ports/data-channel.js';
import { addressMatches, nameMatches, namesExplicitly, parseRules, refusedByDefault, type Rule } from './rules.js';
import { serverName } from './server-name.js';

export interface EgressSpec {
  allow: string[];
  deny: string[];
  /** `never`: no rule unlocks a range refused by default (the rules came from an agent: `aegis mcp`). */
  privateRanges?: 'named' | 'never';
}

/** One decision of the audit trail, a destination's counters, and the policy as the API shows them. */
export type EgressDecision = ApiSchemas['EgressDecision'];
export type EgressCounter = ApiSchemas['EgressView']['counters'][number];
/** The instance's network mode is the instance's to add. */
export type EgressView = Omit<ApiSchemas['EgressView'], 'network' | 'mode'> & { mode: 'default' | 'allow-list' };

/** Bounds per instance: what a guest can make the host hold or do at once. */
export const EGRESS_LIMITS = {
  logEntries: 1000,
  counters: 512,
  pins: 4096,
  /** Concurrent upstream connects (the data channel bounds open connections separately). */
  connecting: 64,
  connectTimeoutMs: 10_000,
  /** A pinned answer outlives its TTL by this much: programs cache answers beyond it. */
  pinGraceMs: 60_000,
  dnsTimeoutMs: 5_000,
} as const;

const RCODE = { NOERROR: 0, SERVFAIL: 2, NXDOMAIN: 3 } as const;

/** What carries the connections to hosts secrets are bound to (egress/broker.ts's SecretBroker). */
export interface Broker {
  /** Whether a connection asking for `name` (TLS SNI, HTTP Host) is to be brokered. */
  brokers(name: string, port?: number): boolean;
  /** Serves one guest connection, whose bytes (from the first) arrive on `guest`. */
  handle(guest: Duplex, dest: GuestDestination, head: Buffer, serverName: string): void;
  /** Ends what it carries (a broker replaced at a restart). */
  close(): void;
}

type Resolve4 = (name: string) => Promise<Array<{ address: string; ttl: number }>>;

export interface EgressOptions {
  /** Host name resolution (tests give their own; default: the host's resolver). */
  resolve4?: Resolve4;
  /** Called after each decision (the instance's owner persists nothing from here; for logs). */
  onDecision?: (d: EgressDecision) => void;
}

export class Egress implements EgressHandler {
  private allowRules: Rule[];
  private denyRules: Rule[];
  private readonly privateNamed: boolean;
  private readonly pins = new Map<string, Map<string, number>>();
  private readonly log: EgressDecision[] = [];
  private readonly counters = new Map<string, EgressCounter>();
  private connecting = 0;
  private broker: Broker | undefined;
  private readonly resolve4: Resolve4;
  private readonly onDecision: ((d: EgressDecision) => void) | undefined;

  constructor(spec: EgressSpec, options: EgressOptions = {}) {
    this.allowRules = parseRules(spec.allow, 'allow');
    this.denyRules = parseRules(spec.deny, 'deny');
    this.privateNamed = spec.privateRanges !== 'never';
    const resolver = new dnsp.Resolver({ timeout: EGRESS_LIMITS.dnsTimeoutMs, tries: 2 });
    this.resolve4 = options.resolve4 ?? ((name) => resolver.resolve4(name, { ttl: true }));
    this.onDecision = options.onDecision;
  }

  get spec(): EgressSpec {
    return {
      allow: this.allowRules.map((r) => r.text),
      deny: this.denyRules.map((r) => r.text),
      ...(this.privateNamed ? {} : { privateRanges: 'never' as const }),
    };
  }

  /** The broker for the instance's secrets bound to hosts (none: every connection is spliced). */
  setBroker(broker: Broker | undefined): void {
    if (this.broker !== broker) this.broker?.close();
    this.broker = broker;
  }

  /**
   * The addresses the guest's own DNS answers gave `name` (unexpired): where a plain-HTTP
   * request for a brokered host may go (the broker checks the address the guest dialled).
   */
  addressesPinnedTo(name: string): string[] {
    const n = name.toLowerCase().replace(/\.$/, '');
    const now = Date.now();
    return [...this.pins].filter(([, names]) => (names.get(n) ?? 0) >= now).map(([address]) => address);
  }

  /** Adds rules while the instance runs; they apply to new connections and queries at once. */
  update(change: { allow?: string[]; deny?: string[] }): EgressSpec {
    const allow = [...this.spec.allow, ...(change.allow ?? []).filter((t) => !this.spec.allow.includes(t))];
    const deny = [...this.spec.deny, ...(change.deny ?? []).filter((t) => !this.spec.deny.includes(t))];
    const allowRules = parseRules(allow, 'allow');
    const denyRules = parseRules(deny, 'deny');
    this.allowRules = allowRules;
    this.denyRules = denyRules;
    return this.spec;
  }

  view(withLog: boolean): EgressView {
    return {
      mode: this.allowRules.length > 0 ? 'allow-list' : 'default',
      ...this.spec,
      counters: [...this.counters.values()].map((c) => ({ ...c })),
      ...(withLog ? { log: this.log.map((d) => ({ ...d })) } : {}),
    };
  }

  // ---- DNS ----------------------------------------------------------------------------------

  async dns(query: Buffer): Promise<Buffer | undefined> {
    let q: dnsPacket.Packet;
    try {
      q = dnsPacket.decode(query);
    } catch {
      return undefined; // not DNS: no answer, as a server ignores garbage
    }
    const question = q.questions?.[0];
    if (!question || q.type !== 'query') return undefined;
    const name = question.name.toLowerCase().replace(/\.$/, '');
    const reply = (rcode: 'NOERROR' | 'NXDOMAIN' | 'SERVFAIL', answers: dnsPacket.Answer[] = []): Buffer =>
      dnsPacket.encode({
        type: 'response',
        id: q.id ?? 0,
        // dns-packet encodes the response code only from the flags' low bits.
        flags: dnsPacket.RECURSION_DESIRED | dnsPacket.RECURSION_AVAILABLE | RCODE[rcode],
        questions: [question],
        answers,
      } as dnsPacket.Packet);

    const denied = this.denyRules.find((r) => nameMatches(r, name));
    if (denied) {
      this.decide({ kind: 'dns', name, allowed: false, reason: `denied by ${denied.text}` });
      return reply('NXDOMAIN');
    }
    const byName = this.allowRules.find((r) => nameMatches(r, name));
    const hasAddressRules = this.allowRules.some((r) => r.target.kind === 'address');
    if (this.allowRules.length > 0 && !byName && !hasAddressRules) {
      this.decide({ kind: 'dns', name, allowed: false, reason: 'not in the allow list' });
      return reply('NXDOMAIN');
    }
    // Only A is answered: the guest has IPv4 only, and other types carry nothing it could use
    // to connect anywhere the policy would not decide again.
    if (question.type !== 'A') return reply('NOERROR');
    let records: Array<{ address: string; ttl: number }>;
    try {
      records = await this.resolve4(name);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOTFOUND' || code === 'ENODATA' || code === dnsp.NOTFOUND || code === dnsp.NODATA)
        return reply(code === 'ENODATA' ? 'NOERROR' : 'NXDOMAIN');
      return reply('SERVFAIL');
    }
    const kept: Array<{ address: string; ttl: number }> = [];
    let why = '';
    for (const r of records) {
      const verdict = this.addressVerdict(r.address, undefined, byName !== undefined);
      if (verdict.allowed) kept.push(r);
      else why = verdict.reason;
    }
    if (kept.length === 0) {
      this.decide({ kind: 'dns', name, allowed: false, reason: records.length ? `answers refused: ${why}` : 'no address' });
      return reply('NXDOMAIN');
    }
    const now = Date.now();
    for (const r of kept) this.pin(r.address, name, now + r.ttl * 1000 + EGRESS_LIMITS.pinGraceMs);
    this.decide({
      kind: 'dns',
      name,
      allowed: true,
      reason: byName ? `allowed by ${byName.text}` : this.allowRules.length ? 'answers in an allowed range' : 'public',
    });
    return reply(
      'NOERROR',
      kept.map((r) => ({ type: 'A', name: question.name, ttl: Math.max(0, Math.min(r.ttl, 3600)), data: r.address }) as dnsPacket.Answer),
    );
  }

  private pin(address: string, name: string, untilMs: number): void {
    let names = this.pins.get(address);
    if (!names) {
      if (this.pins.size >= EGRESS_LIMITS.pins) this.prunePins();
      if (this.pins.size >= EGRESS_LIMITS.pins) this.pins.delete(this.pins.keys().next().value as string);
      names = new Map();
      this.pins.set(address, names);
    }
    names.set(name, Math.max(untilMs, names.get(name) ?? 0));
  }

  private prunePins(): void {
    const now = Date.now();
    for (const [address, names] of this.pins) {
      for (const [name, until] of names) if (until < now) names.delete(name);
      if (names.size === 0) this.pins.delete(address);
    }
  }

  /** Names whose unexpired answers gave this address. */
  private pinnedNames(address: string): string[] {
    const names = this.pins.get(address);
    if (!names) return [];
    const now = Date.now();
    return [...names].filter(([, until]) => until >= now).map(([n]) => n);
  }

  // ---- connections --------------------------------------------------------------------------

  /**
   * Whether an address may be reached: `nameAllowed` when a name the user allowed gave it
   * (which unlocks refused ranges, as naming the address would).
   */
  private addressVerdict(
    address: string,
    port: number | undefined,
    nameAllowed: boolean,
  ): { allowed: boolean; reason: string; byRule?: Rule } {
    const denied = this.denyRules.find((r) => addressMatches(r, address, port));
    if (denied) return { allowed: false, reason: `denied by ${denied.text}` };
    const byAddress = this.allowRules.find((r) => addressMatches(r, address, port));
    const refused = refusedByDefault(address);
    if (refused !== undefined && !this.privateNamed) return { allowed: false, reason: `${refused} address (private ranges: never)` };
    if (refused !== undefined) {
      const explicit = this.allowRules.find((r) => namesExplicitly(r, address) && addressMatches(r, address, port));
      if (explicit) return { allowed: true, reason: `allowed by ${explicit.text}`, byRule: explicit };
      if (nameAllowed) return { allowed: true, reason: 'an allowed name answered with it' };
      return { allowed: false, reason: `${refused} address` };
    }
    if (byAddress) return { allowed: true, reason: `allowed by ${byAddress.text}`, byRule: byAddress };
    if (this.allowRules.length > 0)
      return nameAllowed
        ? { allowed: true, reason: 'an allowed name answered with it' }
        : { allowed: false, reason: 'not in the allow list' };
    return { allowed: true, reason: 'public address' };
  }

  async connect(dest: GuestDestination): Promise<EgressConnection | undefined> {
    const { address, port } = dest;
    const names = this.pinnedNames(address);
    const allowedNames = names.filter(
      (n) => this.allowRules.some((r) => nameMatches(r, n, port)) && !this.denyRules.some((r) => nameMatches(r, n, port)),
    );
    const verdict = this.addressVerdict(address, port, allowedNames.length > 0);
    const label = names[0];
    if (!verdict.allowed) {
      this.decide({ kind: 'connect', ...(label ? { name: label } : {}), address, port, allowed: false, reason: verdict.reason });
      return undefined;
    }
    if (this.connecting >= EGRESS_LIMITS.connecting) {
      this.decide({
        kind: 'connect',
        ...(label ? { name: label } : {}),
        address,
        port,
        allowed: false,
        reason: `${EGRESS_LIMITS.connecting} connections already being opened`,
      });
      return undefined;
    }
    // Allowed because of a name: the TLS server name or HTTP Host must be an allowed name too.
    const byName = this.allowRules.length > 0 && !verdict.byRule;
    const checkNames = byName || this.denyRules.some((r) => r.target.kind !== 'address');
    const entry = this.decide({
      kind: 'connect',
      ...(label ? { name: label } : {}),
      address,
      port,
      allowed: true,
      reason: verdict.reason,
      bytesOut: 0,
      bytesIn: 0,
    });
    // An address a brokered host's name answered with: the first bytes decide between the
    // broker (the name asked for is bound to a secret) and a plain splice.
    const broker = this.broker;
    if (broker && names.some((n) => broker.brokers(n, port))) return this.brokered(broker, dest, entry, checkNames && byName);
    this.connecting++;
    let socket: net.Socket;
    try {
      socket = await openSocket(address, port);
    } catch (err) {
      entry.reason += `; upstream: ${(err as Error).message}`;
      return undefined;
    } finally {
      this.connecting--;
    }
    socket.once('close', () => {
      entry.bytesOut = socket.bytesWritten;
      entry.bytesIn = socket.bytesRead;
      const c = this.counter(label ?? address, port);
      c.bytesOut += socket.bytesWritten;
      c.bytesIn += socket.bytesRead;
    });
    const conn: EgressConnection = { socket };
    if (checkNames) conn.inspect = (head, ended) => this.inspect(head, ended, entry, byName);
    return conn;
  }

  private brokered(broker: Broker, dest: GuestDestination, entry: EgressDecision, byName: boolean): EgressConnection {
    const [mine, theirs] = duplexPair();
    let bytesOut = 0;
    let bytesIn = 0;
    theirs.on('data', (c: Buffer) => (bytesOut += c.length));
    mine.on('data', (c: Buffer) => (bytesIn += c.length));
    theirs.once('close', () => {
      entry.bytesOut = bytesOut;
      entry.bytesIn = bytesIn;
      const c = this.counter(entry.name ?? dest.address, dest.port);
      c.bytesOut += bytesOut;
      c.bytesIn += bytesIn;
    });
    theirs.pause(); // until the first bytes have decided where it goes
    return {
      socket: mine,
      inspect: (head, ended) => {
        const verdict = this.inspect(head, ended, entry, byName);
        if (verdict !== 'ok') return verdict;
        const found = serverName(head);
        if (found.kind === 'more') return 'more';
        const name = found.kind === 'tls' || found.kind === 'http' ? found.name : undefined;
        if (name !== undefined && broker.brokers(name, dest.port)) {
          entry.reason += '; secrets brokered';
          bytesOut += head.length;
          broker.handle(theirs, dest, head, name);
          theirs.resume();
          return 'taken';
        }
        // Stays paused until the upstream connection is there to take the head (pipe resumes it).
        spliceTo(theirs, dest);
        return 'ok';
      },
    };
  }

  private inspect(head: Buffer, _ended: boolean, entry: EgressDecision, byName: boolean): FirstBytesVerdict {
    const found = serverName(head);
    if (found.kind === 'more') return 'more';
    if (found.kind === 'other') return 'ok'; // not TLS or HTTP: the address decided
    const name = found.name;
    const what = found.kind === 'tls' ? 'TLS server name' : 'HTTP Host';
    const deny = (why: string): FirstBytesVerdict => {
      entry.allowed = false;
      entry.reason = why;
      const c = this.counter(entry.name ?? entry.address ?? '?', entry.port);
      c.allowed--;
      c.denied++;
      this.onDecision?.(entry);
      return { deny: why };
    };
    if (name === undefined) return byName ? deny(`no ${what} on a connection allowed by name`) : 'ok';
    if (net.isIP(name)) return byName ? deny(`${what} ${name} is an address, not an allowed name`) : 'ok';
    const denied = this.denyRules.find((r) => nameMatches(r, name, entry.port));
    if (denied) return deny(`${what} ${name} denied by ${denied.text}`);
    if (byName && !this.allowRules.some((r) => nameMatches(r, name, entry.port))) return deny(`${what} ${name} is not in the allow list`);
    entry.name = name;
    return 'ok';
  }

  // ---- the audit trail ----------------------------------------------------------------------

  private decide(d: Omit<EgressDecision, 'timeMs'>): EgressDecision {
    const entry: EgressDecision = { timeMs: Date.now(), ...d };
    this.log.push(entry);
    if (this.log.length > EGRESS_LIMITS.logEntries) this.log.splice(0, this.log.length - EGRESS_LIMITS.logEntries);
    const c = this.counter(d.name ?? d.address ?? '?', d.kind === 'connect' ? d.port : undefined, d.kind);
    if (d.allowed) c.allowed++;
    else c.denied++;
    this.onDecision?.(entry);
    return entry;
  }

  private counter(what: string, port: number | undefined, kind: 'dns' | 'connect' = 'connect'): EgressCounter {
    const destination = kind === 'dns' ? `dns:${what}` : port !== undefined ? `${what}:${port}` : what;
    let c = this.counters.get(destination);
    if (!c) {
      const key = this.counters.size >= EGRESS_LIMITS.counters ? '(other destinations)' : destination;
      c = this.counters.get(key) ?? { destination: key, allowed: 0, denied: 0, bytesOut: 0, bytesIn: 0 };
      this.counters.set(key, c);
    }
    return c;
  }
}

/** Carries a guest connection's bytes to `dest` as they are (one that was not to be brokered). */
function spliceTo(guest: Duplex, dest: GuestDestination): void {
  openSocket(dest.address, dest.port).then(
    (up) => {
      guest.pipe(up);
      up.pipe(guest);
      up.once('close', () => guest.destroy());
      guest.once('close', () => up.destroy());
    },
    () => guest.destroy(),
  );
}

/** Connects upstream; refused, unreachable and slow destinations all fail within the timeout. */
function openSocket(address: string, port: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = net.connect({ host: address, port, noDelay: true });
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new Error(`no answer in ${EGRESS_LIMITS.connectTimeoutMs / 1000} s`));
    }, EGRESS_LIMITS.connectTimeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.removeAllListeners('error');
      socket.on('error', () => socket.destroy());
      resolve(socket);
    });
    socket.once('error', (err) => {
      clearTimeout(timer);
      socket.destroy();
      reject(err);
    });
  });
}
