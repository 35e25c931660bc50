/**
 * `sandbox.getHost(port)`: HTTP to a port the guest listens on. The SDK makes
 * `<port>-<sandboxId>.<domain>`; the sandbox's domain is `localhost:<our port>`, so a request
 * for `http://3000-<id>.localhost:<our port>/` arrives here (browsers and curl resolve
 * `*.localhost` to loopback; elsewhere use `curl --resolve` or send `Host:` yourself), or with
 * the `E2b-Sandbox-Id` / `E2b-Sandbox-Port` headers. It goes to the guest port over the data
 * channel (`Instance.dial`), as `--expose` connections do. As in E2B, this traffic is public
 * (like `aegis run -p` on loopback) unless the sandbox was made with `allowPublicTraffic:
 * false`: then it needs the `e2b-traffic-access-token` header the create answer gave.
 */
import http from 'node:http';
import { AegisError } from '@aegis/protocol';
import type { Instance } from '../instances/instance.js';
import type { Req, Res } from './files-http.js';

/** `<port>-<id>.localhost[:port]` → the guest port and sandbox id. */
export function hostTarget(host: string | undefined): { port: number; id: string } | undefined {
  const m = /^(\d{1,5})-([A-Za-z0-9]+)\.localhost(?::\d+)?$/i.exec(host ?? '');
  if (!m) return undefined;
  const port = Number(m[1]);
  if (port < 1 || port > 65535) return undefined;
  return { port, id: m[2] ?? '' };
}

const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'upgrade', 'te', 'trailer', 'host']);

/** Forwards one HTTP request to `port` in the guest and its answer back. */
export async function proxy(instance: Instance, port: number, req: Req, res: Res, host: string): Promise<void> {
  const conn = await instance.dial(port);
  const headers: http.OutgoingHttpHeaders = { host };
  for (const [k, v] of Object.entries(req.headers)) {
    if (k.startsWith(':') || HOP_BY_HOP.has(k) || k.startsWith('e2b-') || k === 'x-access-token' || k === 'x-api-key') continue;
    if (v !== undefined) headers[k] = v;
  }
  await new Promise<void>((resolve, reject) => {
    const out = http.request(
      {
        method: req.method ?? 'GET',
        path: req.url ?? '/',
        headers,
        createConnection: () => conn as unknown as import('node:net').Socket,
      },
      (answer) => {
        const h: http.OutgoingHttpHeaders = {};
        for (const [k, v] of Object.entries(answer.headers)) if (!HOP_BY_HOP.has(k) && v !== undefined) h[k] = v;
        res.writeHead(answer.statusCode ?? 502, h);
        answer.pipe(res as NodeJS.WritableStream);
        answer.once('end', resolve);
        answer.once('error', reject);
      },
    );
    out.once('error', (err) =>
      reject(
        new AegisError('UNAVAILABLE', `nothing answered on port ${port} in the sandbox (${err.message}): is a server listening there?`),
      ),
    );
    (req as NodeJS.ReadableStream).pipe(out);
  });
}
