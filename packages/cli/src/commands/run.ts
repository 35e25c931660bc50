import { Command } from 'commander';
import { AegisClient } from '@aegis/client';
import { createRequest, withStartOptions, type StartOptions } from './instance/start.js';
import { describeEnd, exit, fail, writeOutput } from '../util.js';

/** start + follow the output + delete, exiting with the workload's exit code. */
export function runCommand(): Command {
  return withStartOptions(new Command('run').description('run a command in a new VM, stream its output, then delete the VM'))
    .option('--rm <bool>', 'delete the instance afterwards (default true)', (v) => v !== 'false')
    .action(async (command: string[], o: StartOptions & { rm?: boolean }) => {
      const api = new AegisClient();
      let handle: string | undefined;
      let interrupted = false;
      const onSigint = (): void => {
        if (interrupted || !handle) process.exit(130);
        interrupted = true;
        void api.stopInstance(handle, { timeoutMs: 2000 }).catch(() => undefined);
      };
      process.on('SIGINT', onSigint);
      let code = 1;
      try {
        const inst = await api.createInstance(createRequest(command, o));
        handle = inst.id;
        for await (const ev of api.logs(inst.id, { follow: true })) {
          if (ev.type === 'output') writeOutput(ev.stream, ev.data);
          else if (ev.type === 'end') code = describeEnd(ev);
        }
        if (interrupted) code = 130;
        if (o.rm !== false) await api.deleteInstance(inst.id, { force: true });
      } catch (err) {
        if (handle && o.rm !== false) await api.deleteInstance(handle, { force: true }).catch(() => undefined);
        fail(err);
      }
      exit(code);
    });
}
