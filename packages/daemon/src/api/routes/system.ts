import { reply, type Route } from '../server.js';
import type { DaemonContext } from '../../daemon.js';

export function systemRoutes(d: DaemonContext): Route[] {
  return [
    {
      method: 'GET',
      path: '/v1/status',
      handler: () =>
        Promise.resolve(
          reply('getStatus', 200, {
            version: d.version,
            pid: process.pid,
            uptimeMs: Math.round(process.uptime() * 1000),
            home: d.config.home,
            backend: {
              name: d.backend.name,
              detail: d.probe.detail,
              acceleration: d.probe.capabilities?.acceleration ?? 'unknown',
              accelerationReason: d.probe.accelerationReason ?? '',
            },
            instances: d.instances.counts(),
            ...(d.instances.poolStatus() ? { pool: d.instances.poolStatus() } : {}),
            eventLoopDelayMs: d.loopDelay.read(),
          }),
        ),
    },
    {
      method: 'POST',
      path: '/v1/shutdown',
      handler: () => {
        setImmediate(() => void d.shutdown());
        return Promise.resolve({ status: 202 });
      },
    },
  ];
}
