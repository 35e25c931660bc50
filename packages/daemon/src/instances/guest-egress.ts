/**
 * One instance's egress, as its owner (instance.ts) uses it: the policy and its decisions
 * (egress/egress.ts, made from the row once and kept for the instance's life), the broker of
 * its secrets bound to hosts, and what a command started in the guest must see for both (the
 * secrets' environment, the broker's CA).
 */
import { AegisError } from '@aegis/protocol';
import type { EgressPolicy, EgressView } from '@aegis/protocol/api';
import { SecretBroker, instanceCa } from '../egress/broker.js';
import { Egress } from '../egress/egress.js';
import type { InstanceRow, Registry } from '../registry/db.js';
import type { SecretStore } from '../secrets/store.js';
import type { EventBus } from '../events/bus.js';
import { identityOf } from './spec.js';

/**
 * Where a workload with brokered secrets finds the broker's CA (harness trust.ts writes both
 * files, in our root and the image's): a full bundle for OpenSSL, Python and curl, the CA alone
 * for Node, which adds it to its own.
 */
export const TRUST_ENV = {
  SSL_CERT_FILE: '/etc/aegis/ca-bundle.pem',
  REQUESTS_CA_BUNDLE: '/etc/aegis/ca-bundle.pem',
  CURL_CA_BUNDLE: '/etc/aegis/ca-bundle.pem',
  NODE_EXTRA_CA_CERTS: '/etc/aegis/egress-ca.pem',
};

export class GuestEgress {
  private state: Egress | undefined;

  constructor(
    private readonly id: string,
    private readonly s: { registry: Registry; secrets: SecretStore; events: EventBus },
  ) {}

  /** The policy of a `user`-network instance (other networks have no egress to decide). */
  of(row: InstanceRow): Egress | undefined {
    if (row.network !== 'user') return undefined;
    this.state ??= new Egress(row.spec.egress ?? { allow: [], deny: [] }, {
      // Refusals are lifecycle events too (`aegis events`), at a bounded rate.
      onDecision: (d) => {
        if (d.allowed) return;
        const destination = d.kind === 'dns' ? `${d.name ?? '?'} (DNS)` : `${d.name ?? d.address ?? '?'}:${d.port ?? '?'}`;
        this.s.events.denied({
          type: 'egress-denied',
          instanceId: this.id,
          handle: row.handle,
          ...(row.spec.labels ? { labels: row.spec.labels } : {}),
          destination,
          reason: d.reason,
        });
      },
    });
    return this.state;
  }

  /**
   * The broker of an instance with secrets bound to hosts (made at each start, and again by a
   * restarted aegisd for a running one: its CA is derived from the instance, not stored); the
   * CA the guest must trust, or undefined when it has none.
   */
  async ensureBroker(row: InstanceRow): Promise<{ caPem: string } | undefined> {
    const egress = this.of(row);
    if (!egress) return undefined;
    const { brokered } = this.s.secrets.environment(row.spec.secrets, identityOf(row), true, { skipMissing: true });
    if (brokered.length === 0) {
      egress.setBroker(undefined);
      return undefined;
    }
    const ca = await instanceCa(this.s.secrets.instanceSeed(identityOf(row)), row.handle);
    egress.setBroker(
      new SecretBroker({
        ca,
        secrets: brokered.map(({ placeholder, value, hosts }) => ({ placeholder, value, hosts })),
        // Plain HTTP goes only to an address the guest's own answers gave the bound name.
        addressesOf: (name) => Promise.resolve(egress.addressesPinnedTo(name)),
      }),
    );
    return { caPem: ca.certPem };
  }

  /**
   * The secrets' part of a command's environment, looked up again by name: values for what is
   * not brokered, placeholders (and where the CA is) for what is.
   */
  secretEnv(row: InstanceRow): Record<string, string> {
    const secrets = this.s.secrets.environment(row.spec.secrets, identityOf(row), row.network === 'user', { skipMissing: true });
    return { ...secrets.env, ...(secrets.brokered.length > 0 ? TRUST_ENV : {}) };
  }

  view(row: InstanceRow, withLog: boolean): EgressView {
    const e = this.of(row);
    if (!e) return { network: row.network, mode: 'off', allow: [], deny: [], counters: [] };
    return { network: row.network, ...e.view(withLog) };
  }

  /** Adds rules (for new connections and queries at once), kept for restarts and a restarted aegisd. */
  update(row: InstanceRow, change: EgressPolicy): EgressView {
    const e = this.of(row);
    if (!e) {
      throw new AegisError(
        'FAILED_PRECONDITION',
        `instance "${row.handle}" has network ${row.network}: egress rules need the default network (user)`,
      );
    }
    const egress = e.update(change);
    this.s.registry.setInstanceSpec(this.id, { ...row.spec, egress });
    return this.view(row, false);
  }
}
