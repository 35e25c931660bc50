import { Command } from 'commander';
import { AegisClient } from '@aegis/client';
import { createRequest, withStartOptions, type StartOptions } from './instance/start.js';
import { describeEnd, exit, failCommand, writeOutput } from '../util.js';

/** start + follow the output + delete, exiting with the workload's exit code. */
export function runCommand(): Command {
  return withStartOptions(new Command('run').description('run a command in a new VM, stream its output, then delete the VM'))
    .option('--rm', 'delete the instance afterwards (the default; --rm=false keeps it)')
    .option('--no-rm', 'keep the instance afterwards')
    .action(async (command: string[], o: StartOptions & { rm?: boolean }) => {
      const api = new AegisClient();
      let handle: string | undefined;
      let interrupts = 0;
      // First Ctrl-C: SIGINT to the workload (it may clean up and exit as it likes).
      // Second: stop the instance. Either way `run` then deletes it, so nothing is left.
      const onSigint = (): void => {
        interrupts++;
        if (!handle || interrupts > 2) process.exit(130);
        if (interrupts === 1) void api.signalInstance(handle, 'SIGINT').catch(() => undefined);
        else void api.stopInstance(handle, { timeoutMs: 2000 }).catch(() => undefined);
      };
      process.on('SIGINT', onSigint);
      // A terminal closed or a supervisor's SIGTERM: the throwaway VM must not outlive us.
      for (const [sig, status] of [
        ['SIGTERM', 143],
        ['SIGHUP', 129],
      ] as const) {
        process.on(sig, () => {
          const h = handle;
          if (!h || o.rm === false) process.exit(status);
          void api
            .deleteInstance(h, { force: true })
            .catch(() => undefined)
            .finally(() => process.exit(status));
        });
      }
      let code = 1;
      try {
        const inst = await api.createInstance({ ...createRequest(command, o), ...(o.rm !== false ? { autoRemove: true } : {}) });
        handle = inst.id;
        for await (const ev of api.logs(inst.id, { follow: true })) {
          if (ev.type === 'output') writeOutput(ev.stream, ev.data);
          else if (ev.type === 'end') code = describeEnd(ev);
        }
        if (interrupts > 1) code = 130;
        if (o.rm !== false) await api.deleteInstance(inst.id, { force: true });
      } catch (err) {
        if (handle && o.rm !== false) await api.deleteInstance(handle, { force: true }).catch(() => undefined);
        failCommand(err);
      }
      exit(code);
    });
}
