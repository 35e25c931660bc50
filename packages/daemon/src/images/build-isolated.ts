/**
 * Image filesystems are built in a worker thread with a heap of its own, capped.
 *
 * Building holds a tree of every path of the image (about 250 bytes each, up to the entry limits
 * of limits.ts), and V8 lets a heap grow to several times what is live before it collects: built
 * in the daemon's own heap, one refused import bomb of 500,000 empty files took aegisd from 106
 * to 516 MiB, and the grown heap stayed reserved afterwards. In a worker the figure no longer
 * depends on what the daemon did before, the cap makes it a bound rather than a tendency (an
 * image needing more is refused with RESOURCE_EXHAUSTED, never an aegisd out of memory), the
 * memory goes back when the worker ends, and the parsing, hashing and inflating of layers leave
 * the event loop that answers the API.
 */
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { AegisError, type ErrorCode } from '@aegis/protocol';
import type { BuildOptions, BuiltFilesystem, LayerFile } from './layers.js';
import { removeTree } from './layers.js';
import type { ImageLimits } from './limits.js';

/**
 * The worker's old generation. An image at the entry limit per image (two layers of 498,000 empty
 * files, 997,000 paths) builds under it in 5½ min, aegisd's RSS growing by 679 MiB at the peak
 * (928 MiB uncapped in the daemon's thread); the tree and its staging plan are what is live.
 * Under 448 the same image is refused, out of memory after 26 s: the cap leaves it some room.
 */
export const BUILD_HEAP_MIB = 640;
/** A small young generation: the per-entry garbage of tar parsing dies young, and is collected sooner. */
const BUILD_YOUNG_MIB = 16;

export interface BuildJob {
  layers: LayerFile[];
  outFile: string;
  workDir: string;
  limits: Partial<ImageLimits> | undefined;
}

export type BuildReply = { built: BuiltFilesystem } | { error: { code: ErrorCode; message: string } };

export interface IsolatedBuildOptions extends BuildOptions {
  /** Lowers BUILD_HEAP_MIB; for tests. */
  heapMiB?: number;
}

/** `buildImageFilesystem` (layers.ts) in a worker thread whose heap is capped at BUILD_HEAP_MIB. */
export async function buildIsolated(layers: LayerFile[], outFile: string, options: IsolatedBuildOptions = {}): Promise<BuiltFilesystem> {
  const { signal } = options;
  const heapMiB = options.heapMiB ?? BUILD_HEAP_MIB;
  if (signal?.aborted) throw new AegisError('CANCELLED', 'building the image filesystem was cancelled');
  // A worker that dies (out of memory) cannot clean up: everything it writes is under this directory.
  const workRoot = path.resolve(options.workDir ?? path.dirname(outFile));
  await fs.mkdir(workRoot, { recursive: true });
  const workDir = await fs.mkdtemp(path.join(workRoot, '.build-'));
  const job: BuildJob = { layers, outFile, workDir, limits: options.limits };
  const worker = new Worker(workerFile(), {
    workerData: job,
    resourceLimits: { maxOldGenerationSizeMb: heapMiB, maxYoungGenerationSizeMb: BUILD_YOUNG_MIB },
    // The daemon's own flags (an inspector, say) are not the worker's business.
    execArgv: [],
  });
  const abort = (): void => worker.postMessage('abort');
  signal?.addEventListener('abort', abort, { once: true });
  try {
    const reply = await new Promise<BuildReply>((resolve, reject) => {
      worker.on('message', resolve);
      worker.on('error', (err: Error & { code?: string }) => {
        if (err.code === 'ERR_WORKER_OUT_OF_MEMORY') {
          reject(
            new AegisError(
              'RESOURCE_EXHAUSTED',
              `preparing the image's filesystem needed more than ${heapMiB} MiB of memory, the limit per image`,
            ),
          );
        } else reject(AegisError.from(err));
      });
      worker.on('exit', (code) => reject(new AegisError('INTERNAL', `the image build worker exited (code ${code}) without an answer`)));
    });
    if ('error' in reply) throw new AegisError(reply.error.code, reply.error.message);
    return reply.built;
  } finally {
    signal?.removeEventListener('abort', abort);
    await worker.terminate();
    await removeTree(workDir);
  }
}

/**
 * The compiled worker beside this module; under vitest this module runs from src/, where only the
 * TypeScript exists, and the worker is the one in dist/ (every test run builds first).
 */
function workerFile(): URL {
  const here = new URL('./build-worker.js', import.meta.url);
  return existsSync(fileURLToPath(here)) ? here : new URL('../../dist/images/build-worker.js', import.meta.url);
}
