import { InvalidArgumentError } from 'commander';
import type { CreateInstanceRequest, PortMapping } from '@aegis/client';

type Expose = NonNullable<CreateInstanceRequest['exposes']>[number];

/**
 * Docker's `-p` syntax: `GUEST`, `HOST:GUEST`, `IP:HOST:GUEST` (`[v6]:HOST:GUEST`), with an
 * optional `/tcp`. An empty HOST (`IP::GUEST`) means any free port.
 */
export function parseExpose(v: string, previous: Expose[] = []): Expose[] {
  const [spec, proto, ...extra] = v.split('/');
  if (extra.length > 0 || (proto !== undefined && proto !== 'tcp')) {
    throw new InvalidArgumentError(`"${v}": only tcp can be exposed`);
  }
  const m = /^(?:(\[[0-9a-fA-F:.]+\]|\d+\.\d+\.\d+\.\d+|localhost):)?(?:(\d*):)?(\d+)$/.exec(spec ?? '');
  if (!m) throw new InvalidArgumentError(`"${v}" is not GUEST, HOST:GUEST or IP:HOST:GUEST`);
  const port = (s: string): number => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError(`"${v}": ports are 1-65535`);
    return n;
  };
  const guestPort = port(m[3] ?? '');
  if (guestPort === 0) throw new InvalidArgumentError(`"${v}": ports are 1-65535`);
  const e: Expose = { guestPort, protocol: 'tcp' };
  if (m[2]) e.hostPort = port(m[2]);
  if (m[1]) e.hostIp = m[1] === 'localhost' ? '127.0.0.1' : m[1].replace(/^\[|\]$/g, '');
  return [...previous, e];
}

export function formatPorts(ports: PortMapping[]): string {
  return ports.map((p) => `${p.hostIp.includes(':') ? `[${p.hostIp}]` : p.hostIp}:${p.hostPort}->${p.guestPort}/${p.protocol}`).join(', ');
}
