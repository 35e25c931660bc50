import path from 'node:path';
import { Command } from 'commander';
import { MultiBar, Presets, type SingleBar } from 'cli-progress';
import { AegisError, isAegisError, type Image, type PullEvent } from '@aegis/client';
import { age, client, errorsAsJson, fail, table } from '../../util.js';

const mib = (n: number): string => `${(n / (1 << 20)).toFixed(1)} MiB`;
const short = (digest: string): string => digest.replace(/^sha256:/, '').slice(0, 12);

/**
 * One bar per layer on a terminal, like `docker pull`; plain lines otherwise (logs, CI); with
 * --json, each event as a JSON line on stdout.
 */
function progressView(json = false): { on: (ev: PullEvent) => void; stop: () => void } {
  if (json) return { on: (ev) => void process.stdout.write(JSON.stringify(ev) + '\n'), stop: () => undefined };
  if (!process.stderr.isTTY) {
    return {
      on: (ev) => {
        if (ev.type === 'preparing') process.stderr.write(`preparing filesystem for ${short(ev.digest)}\n`);
      },
      stop: () => undefined,
    };
  }
  const multi = new MultiBar(
    // Not {total}/{value}: cli-progress fills those itself, with raw byte counts.
    { format: '{id} {phase} [{bar}] {doneMiB}/{totalMiB}', stream: process.stderr, hideCursor: true, clearOnComplete: false },
    Presets.shades_grey,
  );
  const bars = new Map<string, SingleBar>();
  return {
    on: (ev) => {
      if (ev.type === 'progress' && ev.phase === 'layer') {
        const payload = { id: short(ev.digest), phase: 'layer', doneMiB: mib(ev.doneBytes), totalMiB: mib(ev.totalBytes) };
        let bar = bars.get(ev.digest);
        if (!bar) {
          bar = multi.create(Math.max(1, ev.totalBytes), 0, payload);
          bars.set(ev.digest, bar);
        }
        bar.update(ev.doneBytes, payload);
      } else if (ev.type === 'preparing') {
        multi.log(`preparing filesystem for ${short(ev.digest)}\n`);
      }
    },
    stop: () => multi.stop(),
  };
}

function imageRows(images: Image[]): string[][] {
  const rows = [['REFERENCE', 'DIGEST', 'SIZE', 'FILESYSTEM', 'CREATED']];
  for (const i of images) {
    for (const ref of i.references.length > 0 ? i.references : ['<none>']) {
      rows.push([ref, short(i.digest), mib(i.sizeBytes), mib(i.fsBytes), i.created ? `${age(i.created)} ago` : '']);
    }
  }
  return rows;
}

/** Pulls `ref` with progress; resolves with the pulled image's first reference. */
async function pull(ref: string, json: boolean): Promise<PullEvent & { type: 'done' }> {
  const view = progressView(json);
  try {
    for await (const ev of client().pullImage(ref)) {
      view.on(ev);
      if (ev.type === 'done') return ev;
    }
    throw new AegisError('INTERNAL', 'the pull ended without a result');
  } finally {
    view.stop();
  }
}

/** `run`/`start --image`: a missing image is pulled here, with progress, before the instance is created. */
export async function ensureImage(ref: string, json: boolean): Promise<void> {
  try {
    await client().getImage(ref);
  } catch (err) {
    if (!isAegisError(err, 'NOT_FOUND')) throw err;
    if (!json) process.stderr.write(`Unable to find image '${ref}' locally\n`);
    await pull(ref, json);
  }
}

/** `image pull`, and Docker's top-level `pull`. */
export function pullCommand(): Command {
  return new Command('pull')
    .description('pull an image (any reference docker takes) and prepare its filesystem')
    .argument('<REF>', 'e.g. python:3.12, registry.example:5000/team/tools:1.2, name@sha256:...')
    .option('--json', 'progress and result as JSON lines on stdout')
    .action(async (ref: string, o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const ev = await pull(ref, o.json === true);
        if (!o.json) process.stdout.write(`${ev.image.references[0] ?? ref}: ${ev.cached ? 'up to date' : 'pulled'}\n${ev.image.digest}\n`);
      } catch (err) {
        fail(err);
      }
    });
}

/** `image list`, and Docker's top-level `images`. */
export function imageListCommand(name: 'list' | 'images' = 'list'): Command {
  const cmd = new Command(name);
  if (name === 'list') cmd.alias('ls');
  return cmd
    .description('stored images: reference, digest, size, created')
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      errorsAsJson(o.json);
      try {
        const images = await client().listImages();
        process.stdout.write(o.json ? JSON.stringify(images, null, 2) + '\n' : table(imageRows(images)));
      } catch (err) {
        fail(err);
      }
    });
}

export function imageCommand(): Command {
  const image = new Command('image').description('OCI images: pull from registries, import archives, list, remove');
  image.addCommand(pullCommand());
  image
    .command('import')
    .description('import a `docker save` or OCI image-layout tar')
    .argument('<FILE>')
    .option('--name <REF>', 'reference for an image the archive leaves unnamed')
    .action(async (file: string, o: { name?: string }) => {
      try {
        const images = await client().importImage(path.resolve(file), o.name);
        for (const i of images) process.stdout.write(`${i.references[0] ?? '<none>'} ${i.digest}\n`);
      } catch (err) {
        fail(err);
      }
    });
  image.addCommand(imageListCommand());
  image
    .command('rm')
    .alias('delete')
    .description('untag a reference (the image goes with its last one), or remove an image by digest; refused while an instance runs it')
    .argument('<REF>', 'reference or digest')
    .action(async (ref: string) => {
      try {
        const r = await client().removeImage(ref);
        for (const u of r.untagged) process.stdout.write(`untagged: ${u}\n`);
        if (r.deleted) process.stdout.write(`deleted: ${r.deleted}\n`);
      } catch (err) {
        fail(err);
      }
    });
  return image;
}
