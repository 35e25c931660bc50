/**
 * What every envd call needs: the sandbox it is for (`E2b-Sandbox-Id`, checked by the server
 * before any service runs) as an instance, the user it acts as (envd's `Authorization: Basic
 * user:`), and paths as envd resolves them (relative to that user's home).
 */
import http2 from 'node:http2';
import type http from 'node:http';
import path from 'node:path';
import { createContextKey } from '@connectrpc/connect';
import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import type { Instance } from '../instances/instance.js';
import { e2bState } from './sandboxes.js';

export const SANDBOX_ID_HEADER = 'e2b-sandbox-id';
export const SANDBOX_PORT_HEADER = 'e2b-sandbox-port';
/** envd's port: calls for it are envd's; any other port is the guest's own (getHost). */
export const ENVD_PORT = 49983;

/** The instance of sandbox `id`, if E2B may use it (running, paused or hibernated). */
export function sandboxInstance(d: DaemonContext, id: string | null | undefined): Instance {
  if (!id) throw new AegisError('INVALID_ARGUMENT', 'missing E2b-Sandbox-Id header');
  const v = d.instances.get(id);
  if (v.id !== id) throw new AegisError('NOT_FOUND', `sandbox ${id} not found`);
  if (!e2bState(v.state)) throw new AegisError('NOT_FOUND', `sandbox ${id} not found (its instance is ${v.state})`);
  return d.instances.instance(v.id);
}

/** envd's user from `Authorization: Basic base64(user:)`; undefined: the default (root here). */
export function userOf(authorization: string | null | undefined): string | undefined {
  if (!authorization) return undefined;
  const m = /^Basic\s+([A-Za-z0-9+/=]+)$/i.exec(authorization.trim());
  if (!m) throw new AegisError('INVALID_ARGUMENT', 'Authorization must be Basic base64(user:)');
  const decoded = Buffer.from(m[1] ?? '', 'base64').toString('utf8');
  const user = decoded.includes(':') ? decoded.slice(0, decoded.indexOf(':')) : decoded;
  if (user === '') return undefined;
  if (!/^[^:\s\0]{1,256}$/.test(user)) throw new AegisError('INVALID_ARGUMENT', 'bad user name in Authorization');
  return user;
}

/** The user's home as envd has it: /root for root (our default), /home/NAME otherwise. */
export function homeOf(user: string | undefined): string {
  return user === undefined || user === 'root' || user === '0' ? '/root' : `/home/${user}`;
}

/** An absolute guest path: relative ones are under the user's home, as envd resolves them. */
export function guestPath(p: string, user: string | undefined): string {
  if (p.includes('\0')) throw new AegisError('INVALID_ARGUMENT', 'a path may not contain NUL');
  if (p === '') throw new AegisError('INVALID_ARGUMENT', 'path is required');
  const abs = p.startsWith('~/') || p === '~' ? path.posix.join(homeOf(user), p.slice(1)) : path.posix.resolve(homeOf(user), p);
  if (abs.length > 4096) throw new AegisError('INVALID_ARGUMENT', 'path is longer than 4096 characters');
  return abs;
}

/** The raw HTTP request under a Connect call (set by the server), for cutting its connection. */
export const RAW_REQUEST = createContextKey<http.IncomingMessage | http2.Http2ServerRequest | undefined>(undefined, {
  description: 'the raw HTTP request of an envd call',
});

/**
 * Cuts a call's connection (HTTP/2: its stream) without an answer: what a client sees when the
 * sandbox behind E2B's proxy dies mid-call; the SDK then asks /health and reports the sandbox gone.
 */
export function cutConnection(req: http.IncomingMessage | http2.Http2ServerRequest | undefined): void {
  if (!req) return;
  if ('stream' in req && req.stream) req.stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
  else req.socket.destroy();
}
