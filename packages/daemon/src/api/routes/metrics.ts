import type { DaemonMetrics } from '../../metrics.js';
import { STREAMED, type Route } from '../server.js';

export function metricsRoutes(metrics: DaemonMetrics): Route[] {
  return [
    {
      method: 'GET',
      path: '/metrics',
      handler: async ({ res }) => {
        const text = await metrics.text();
        res.writeHead(200, {
          'content-type': metrics.contentType(),
          'content-length': Buffer.byteLength(text),
          'cache-control': 'no-store',
        });
        res.end(text);
        return STREAMED;
      },
    },
  ];
}
