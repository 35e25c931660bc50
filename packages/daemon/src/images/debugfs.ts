/**
 * What only root could have set on the host (owners, modes, times, device nodes, fifos, extended
 * attributes) written into the finished filesystem by one `debugfs -w` script.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import type { Inode, Kind, LayerTree } from './layer-tree.js';
import { run, type Plan } from './mke2fs.js';

/** A debugfs argument: ss_parse takes `"..."` with `""` for a literal quote. */
function quote(value: string): string {
  return `"${value.replaceAll('"', '""')}"`;
}

const TYPE_BITS: Record<Kind, number> = {
  file: 0o100000,
  dir: 0o040000,
  symlink: 0o120000,
  char: 0o020000,
  block: 0o060000,
  fifo: 0o010000,
};

/**
 * The debugfs commands that give every inode its metadata. Each directory's entries are addressed
 * relative to it after one `cd`: a full path costs a lookup in every ancestor, which made the
 * script four times slower on a Debian image.
 */
export async function writeScript(tree: LayerTree, plan: Plan, work: string): Promise<string> {
  const script = path.join(work, 'debugfs.script');
  const fh = await fs.open(script, 'wx', 0o600);
  try {
    await writeCommands(tree, plan, work, new Lines(fh));
  } finally {
    await fh.close();
  }
  return script;
}

/**
 * The script's lines, written out a megabyte at a time: six or more per inode, they took 260 MiB
 * of heap for 200,000 empty files when the script was built whole.
 */
class Lines {
  private chunk: string[] = [];
  private length = 0;

  constructor(private readonly fh: fs.FileHandle) {}

  push(...lines: string[]): void {
    for (const line of lines) {
      this.chunk.push(line);
      this.length += line.length + 1;
    }
  }

  /** Writes what is buffered once there is enough of it, or all of it with `force`. */
  async flush(force = false): Promise<void> {
    if (this.length === 0 || (!force && this.length < 1 << 20)) return;
    const text = this.chunk.join('\n') + '\n';
    this.chunk = [];
    this.length = 0;
    await this.fh.write(text);
  }
}

async function writeCommands(tree: LayerTree, plan: Plan, work: string, lines: Lines): Promise<void> {
  // mke2fs always makes /lost+found; an image that does not have one should not grow one.
  // rmdir must get a bare name: given `/lost+found` it unlinks from the wrong directory.
  if (!tree.root.children!.has('lost+found')) lines.push('cd /', 'rmdir lost+found');
  const specialNames = new Map<Inode, number>();
  let cwd = '/';
  /** The name as an argument relative to its directory, changing to that directory first. */
  const at = (abs: string): string => {
    if (abs === '/') return '/';
    const cut = abs.lastIndexOf('/');
    const dir = cut === 0 ? '/' : abs.slice(0, cut);
    if (cwd !== dir) lines.push(`cd ${quote(dir)}`);
    cwd = dir;
    const name = abs.slice(cut + 1);
    // `<12>` would name inode 12 and `-x` an option of ea_set; `./` keeps them plain names.
    return quote(name.startsWith('<') || name.startsWith('-') ? `./${name}` : name);
  };
  let xattrFiles = 0;
  const xattrDir = path.join(work, 'xattrs');
  const writes: Promise<void>[] = [];
  for (const { path: abs, node } of plan.entries) {
    await lines.flush();
    const inode = node.inode;
    const special = inode.kind === 'char' || inode.kind === 'block' || inode.kind === 'fifo';
    const first = plan.primary.get(inode)!;
    if (first !== abs && inode.kind !== 'symlink') {
      if (special) {
        // debugfs's ln does not count links; links_count is set once all are made.
        const name = at(abs);
        lines.push(`ln ${quote(first)} ${name}`);
        specialNames.set(inode, (specialNames.get(inode) ?? 1) + 1);
      }
      continue;
    }
    const p = at(abs);
    if (special) {
      // mknod makes its argument one entry of the current directory, slashes and all; `at` changed to it.
      const device = inode.kind === 'fifo' ? 'p' : `${inode.kind === 'char' ? 'c' : 'b'} ${inode.major} ${inode.minor}`;
      lines.push(`mknod ${p} ${device}`);
    }
    // The kernel gives every symlink 0777 and ignores its mode; so did the staging tree.
    if (inode.kind !== 'symlink') lines.push(`sif ${p} mode 0${(TYPE_BITS[inode.kind] | inode.perm).toString(8)}`);
    lines.push(`sif ${p} uid ${inode.uid}`, `sif ${p} gid ${inode.gid}`);
    // crtime needs nothing: e2fsprogs stamps new inodes with the pinned clock (see `run`).
    for (const field of ['mtime', 'atime', 'ctime']) lines.push(`sif ${p} ${field} @${inode.mtime}`);
    for (const [name, value] of inode.xattrs ?? []) {
      const file = path.join(xattrDir, String(xattrFiles++));
      if (xattrFiles === 1) await fs.mkdir(xattrDir, { mode: 0o700 });
      writes.push(fs.writeFile(file, value, { mode: 0o600 }));
      lines.push(`ea_set -f ${quote(file)} ${p} ${quote(name)}`);
    }
  }
  for (const [inode, count] of specialNames) lines.push(`sif ${quote(plan.primary.get(inode)!)} links_count ${count}`);
  await Promise.all(writes);
  await lines.flush(true);
}

export async function runDebugfs(file: string, script: string, epoch: number, signal: AbortSignal | undefined): Promise<void> {
  const { stderr } = await run('debugfs', ['-w', '-f', script, file], epoch, signal);
  // debugfs reports a failed command on stderr and carries on with exit status 0.
  const problems = stderr
    .split('\n')
    .filter((l) => l.trim() !== '' && !/^debugfs \d/.test(l))
    .slice(0, 5);
  if (problems.length > 0) throw new AegisError('INTERNAL', `debugfs could not apply the image's metadata: ${problems.join('; ')}`);
}
