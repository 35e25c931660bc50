import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../../daemon.js';
import { validateBody } from '../validate.js';
import { reply, type Route } from '../server.js';

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
      handler: async () => reply('listVolumes', 200, { volumes: await volumes.list() }),
    },
    {
      method: 'POST',
      path: '/v1/volumes',
      handler: async ({ body }) => {
        const req = validateBody('CreateVolumeRequest', body);
        const { volume, created } = await volumes.create(req.name, req.sizeMiB);
        return created ? reply('createVolume', 201, volume) : reply('createVolume', 200, volume);
      },
    },
    {
      method: 'GET',
      path: '/v1/volumes/{name}',
      handler: async ({ params }) => reply('getVolume', 200, await volumes.get(name(params))),
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
