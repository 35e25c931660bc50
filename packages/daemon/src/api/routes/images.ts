import type { DaemonContext } from '../../daemon.js';
import { AegisError } from '@aegis/protocol';
import { STREAMED, startStream, type Route } from '../server.js';
import { validateBody } from '../validate.js';

function ref(params: Record<string, string>): string {
  const r = params['ref'];
  if (r === undefined || r === '') throw new AegisError('INVALID_ARGUMENT', 'missing image reference');
  return r;
}

export function imageRoutes(d: DaemonContext): Route[] {
  return [
    {
      method: 'GET',
      path: '/v1/images',
      handler: () => Promise.resolve({ status: 200, body: { images: d.images.list() } }),
    },
    {
      method: 'GET',
      path: '/v1/images/{ref}',
      handler: ({ params }) => Promise.resolve({ status: 200, body: d.images.get(ref(params)) }),
    },
    {
      method: 'POST',
      path: '/v1/images/pull',
      handler: async ({ body, signal, res }) => {
        const req = validateBody<{ reference: string }>('PullImageRequest', body);
        // Progress streams as NDJSON; an error after the first event is the stream's last event.
        let write: ((ev: unknown) => void) | undefined;
        try {
          await d.images.pull(
            req.reference,
            (ev) => {
              write ??= startStream(res);
              write(ev);
            },
            signal,
          );
        } catch (err) {
          if (!write) throw err;
          write({ type: 'error', ...AegisError.from(err).toWire() });
        }
        res.end();
        return STREAMED;
      },
    },
    {
      method: 'POST',
      path: '/v1/images/import',
      handler: async ({ body, signal }) => {
        const req = validateBody<{ path: string; reference?: string }>('ImportImageRequest', body);
        return { status: 200, body: { images: await d.images.import(req.path, req.reference, signal) } };
      },
    },
    {
      method: 'DELETE',
      path: '/v1/images/{ref}',
      handler: async ({ params }) => ({
        status: 200,
        body: await d.images.remove(ref(params), (digest) => d.instances.userOfImage(digest)),
      }),
    },
  ];
}
