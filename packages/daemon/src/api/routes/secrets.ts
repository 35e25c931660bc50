import { AegisError } from '@aegis/protocol';
import type { DaemonContext } from '../../daemon.js';
import { validateBody } from '../validate.js';
import { reply, type Route } from '../server.js';

function name(params: Record<string, string>): string {
  const n = params['name'];
  if (n === undefined) throw new AegisError('INVALID_ARGUMENT', 'missing secret name');
  return n;
}

export function secretRoutes(d: DaemonContext): Route[] {
  return [
    {
      method: 'GET',
      path: '/v1/secrets',
      handler: () => Promise.resolve(reply('listSecrets', 200, { secrets: d.secrets.list() })),
    },
    {
      method: 'PUT',
      path: '/v1/secrets/{name}',
      handler: ({ params, body }) => {
        const req = validateBody('SetSecretRequest', body);
        return Promise.resolve(reply('setSecret', 200, d.secrets.set(name(params), req.value, req.hosts ?? [])));
      },
    },
    {
      method: 'DELETE',
      path: '/v1/secrets/{name}',
      handler: ({ params }) => {
        d.secrets.delete(name(params));
        return Promise.resolve({ status: 204 });
      },
    },
  ];
}
