import { Command } from 'commander';
import { formatPorts } from '../../ports.js';
import { formatVolumes } from '../../volumes.js';
import { client, errorsAsJson, fail, formatMs, shellJoin } from '../../util.js';

export function infoCommand(): Command {
  return new Command('info')
    .alias('inspect')
    .description('show one instance')
    .argument('<instance>', 'handle, id or id prefix')
    .option('--json', 'print JSON')
    .action(async (ref: string, o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const i = await client().getInstance(ref);
        if (o.json) {
          process.stdout.write(JSON.stringify(i, null, 2) + '\n');
          return;
        }
        const lines: [string, string | number | null | undefined][] = [
          ['Handle', i.handle],
          ['ID', i.id],
          ['State', i.idlePaused ? `${i.state} (idle)` : i.state],
          ['Reason', i.stateReason],
          ['Exit code', i.exitCode],
          ['Command', shellJoin(i.command)],
          ['User', i.user],
          ['Workdir', i.workdir],
          [
            'Labels',
            i.labels && Object.keys(i.labels).length > 0
              ? Object.entries(i.labels)
                  .map(([k, v]) => `${k}=${v}`)
                  .join(', ')
              : undefined,
          ],
          ['Image', i.image ? `${i.image}${i.imageDigest && i.imageDigest !== i.image ? ` (${i.imageDigest})` : ''}` : undefined],
          ['Ports', i.ports.length > 0 ? formatPorts(i.ports) : undefined],
          ['Volumes', i.volumes.length > 0 ? formatVolumes(i.volumes) : undefined],
          ['Network', i.network],
          ['Memory', `${i.memoryMiB} MiB`],
          ['vCPUs', i.vcpuCount],
          ['Backend', i.backend],
          ['Created', i.createdAt],
          ['Started', i.startedAt],
          ['Deadline', i.deadline],
          ['Idle', i.idlePauseMs !== undefined ? `pauses after ${formatMs(i.idlePauseMs)} unused` : undefined],
          ['Hibernate', i.idleHibernateMs !== undefined ? `after ${formatMs(i.idleHibernateMs)} unused` : undefined],
          ['Stopped', i.stoppedAt],
        ];
        for (const [k, v] of lines) if (v !== undefined && v !== null) process.stdout.write(`${`${k}:`.padEnd(11)}${v}\n`);
      } catch (err) {
        fail(err);
      }
    });
}
