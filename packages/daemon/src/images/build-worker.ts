/**
 * The worker side of build-isolated.ts: builds one image filesystem and reports how it went.
 * An 'abort' message cancels the build, which then cleans up after itself as it would in the
 * daemon's own thread.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { AegisError } from '@aegis/protocol';
import { buildImageFilesystem } from './layers.js';
import type { BuildJob, BuildReply } from './build-isolated.js';

const port = parentPort;
if (!port) throw new Error('build-worker.js runs only as a worker thread (see build-isolated.ts)');
const job = workerData as BuildJob;
const controller = new AbortController();
port.on('message', (message: unknown) => {
  if (message === 'abort') controller.abort();
});
buildImageFilesystem(job.layers, job.outFile, { signal: controller.signal, workDir: job.workDir, limits: job.limits }).then(
  (built) => port.postMessage({ built } satisfies BuildReply),
  (err: unknown) => {
    const e = AegisError.from(err);
    port.postMessage({ error: { code: e.code, message: e.message } } satisfies BuildReply);
  },
);
