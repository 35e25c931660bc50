import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../../daemon.js';
import { validateBody } from '../validate.js';
import type { Route } from '../server.js';

function name(params: Record<string, string>): string {
  const n = params['name'];
  if (n === undefined) throw new AegisError('INVALID_ARGUMENT', 'missing volume name');
  return n;
}

export function volumeRoutes(d: DaemonContext): Route[] {
  const volumes = d.instances.volumes;
  return [
    {
      method: 'GET',
      path: '/v1/volumes',
      handler: async () => ({ status: 200, body: { volumes: await volumes.list() } }),
    },
    {
      method: 'POST',
      path: '/v1/volumes',
      handler: async ({ body }) => {
        const req = validateBody<{ name: string; sizeMiB?: number }>('CreateVolumeRequest', body);
        const { volume, created } = await volumes.create(req.name, req.sizeMiB);
        return { status: created ? 201 : 200, body: volume };
      },
    },
    {
      method: 'GET',
      path: '/v1/volumes/{name}',
      handler: async ({ params }) => ({ status: 200, body: await volumes.get(name(params)) }),
    },
    {
      method: 'DELETE',
      path: '/v1/volumes/{name}',
      handler: async ({ params }) => {
        await volumes.remove(name(params));
        return { status: 204 };
      },
    },
  ];
}
