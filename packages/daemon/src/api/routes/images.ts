import type { DaemonContext } from '../../daemon.js';
import { AegisError } from '@aegis/protocol';
import { reply, STREAMED, startStream, type Route } from '../server.js';
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
      handler: () => Promise.resolve(reply('listImages', 200, { images: d.images.list() })),
    },
    {
      method: 'GET',
      path: '/v1/images/{ref}',
      handler: ({ params }) => Promise.resolve(reply('getImage', 200, d.images.get(ref(params)))),
    },
    {
      method: 'POST',
      path: '/v1/images/pull',
      handler: async ({ body, signal, res }) => {
        const req = validateBody('PullImageRequest', body);
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
        const req = validateBody('ImportImageRequest', body);
        return reply('importImage', 200, { images: await d.images.import(req.path, req.reference, signal) });
      },
    },
    {
      method: 'DELETE',
      path: '/v1/images/{ref}',
      handler: async ({ params }) =>
        reply('removeImage', 200, await d.images.remove(ref(params), (digest) => d.instances.userOfImage(digest))),
    },
  ];
}
