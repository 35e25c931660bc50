/**
 * Makes the ext4 file from the tree as an unprivileged user: the tree is laid out in a staging
 * directory with only what such a user can create, and `mke2fs -d` copies it into a filesystem
 * sized from the tree, so nothing is guessed and nothing is wasted.
 */
import { spawn } from 'node:child_process';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';
import { MAX_PENDING_WRITES, type ContentStore } from './content-store.js';
import type { Inode, LayerTree, TreeNode } from './layer-tree.js';

const BLOCK_BYTES = 4096;
const INODE_BYTES = 256;
const BLOCKS_PER_GROUP = 32768;

export interface Plan {
  /** Every name in the tree with its absolute path, parents before children. */
  entries: { path: string; node: TreeNode }[];
  /** Path of the first name of each inode: the one its metadata is written through. */
  primary: Map<Inode, string>;
  names: number;
  inodes: number;
  blocks: number;
  /** Newest mtime in the image; stands in for "now" wherever e2fsprogs would stamp the clock. */
  epoch: number;
}

/**
 * Lays the tree out on the host as the current user: directories (0700, so we can traverse them),
 * file contents (0600), symlinks and hard links. Special files are left to debugfs.
 */
export async function stage(tree: LayerTree, staging: string, store: ContentStore): Promise<Plan> {
  const plan: Plan = { entries: [], primary: new Map(), names: 0, inodes: 0, blocks: 0, epoch: 1 };
  const visit = (node: TreeNode, abs: string): void => {
    plan.entries.push({ path: abs, node });
    if (!node.children) return;
    for (const [name, child] of node.children) visit(child, abs === '/' ? `/${name}` : `${abs}/${name}`);
  };
  visit(tree.root, '/');
  plan.names = plan.entries.length - 1;

  await fs.mkdir(staging, { mode: 0o700 });
  const host = (abs: string): string => path.join(staging, abs);
  const links: { from: string; to: string }[] = [];
  const leaves: (() => Promise<void>)[] = [];
  for (const { path: abs, node } of plan.entries) {
    const inode = node.inode;
    plan.epoch = Math.max(plan.epoch, inode.mtime);
    plan.blocks += direntBlocks(abs);
    const first = plan.primary.get(inode);
    if (first !== undefined && inode.kind === 'symlink') {
      // mke2fs -d copies a hard-linked symlink as a second symlink, so stage it as one; the script
      // then gives every symlink name its own metadata.
      plan.inodes++;
      plan.blocks += inodeBlocks(node);
      leaves.push(() => fs.symlink(inode.target, host(abs)));
      continue;
    }
    if (first !== undefined) {
      if (inode.kind === 'file') links.push({ from: host(first), to: host(abs) });
      continue;
    }
    plan.primary.set(inode, abs);
    plan.inodes++;
    plan.blocks += inodeBlocks(node);
    if (node.children) {
      if (abs !== '/') await fs.mkdir(host(abs), { mode: 0o700 });
    } else if (inode.kind === 'file') {
      const blob = inode.blob;
      leaves.push(() =>
        blob === undefined ? fs.writeFile(host(abs), '', { flag: 'wx', mode: 0o600 }) : fs.rename(store.pathOf(blob), host(abs)),
      );
    } else if (inode.kind === 'symlink') {
      leaves.push(() => fs.symlink(inode.target, host(abs)));
    }
  }
  await inParallel(leaves, MAX_PENDING_WRITES);
  await inParallel(
    links.map((l) => () => fs.link(l.from, l.to)),
    MAX_PENDING_WRITES,
  );
  return plan;
}

async function inParallel(tasks: (() => Promise<void>)[], limit: number): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < tasks.length) await tasks[next++]!();
  };
  await Promise.all(Array.from({ length: Math.min(limit, tasks.length) }, worker));
}

function direntBlocks(abs: string): number {
  // A directory entry costs 8 bytes plus the name rounded up to 4; charged to the parent as blocks.
  const name = abs.slice(abs.lastIndexOf('/') + 1);
  return (8 + Math.ceil(Buffer.byteLength(name) / 4) * 4) / (BLOCK_BYTES - 12);
}

function inodeBlocks(node: TreeNode): number {
  const inode = node.inode;
  let blocks = 0;
  if (inode.kind === 'file') {
    const data = Math.ceil(inode.size / BLOCK_BYTES);
    // An extent covers at most 32768 blocks; past four extents the tree needs index blocks.
    blocks += data + (data > 4 * BLOCKS_PER_GROUP ? Math.ceil(data / BLOCKS_PER_GROUP / 340) + 1 : 0);
  } else if (inode.kind === 'symlink' && Buffer.byteLength(inode.target) >= 60) {
    blocks += 1;
  } else if (inode.kind === 'dir') {
    // Entries never straddle blocks, so every directory may waste most of its last block.
    blocks += 1;
  }
  if (inode.xattrs?.size) blocks += 1;
  return blocks;
}

/** A filesystem just big enough: the estimate from the tree, grown and retried if mke2fs runs out. */
export async function makeFilesystem(
  file: string,
  staging: string,
  plan: Plan,
  seed: Buffer,
  signal: AbortSignal | undefined,
): Promise<void> {
  // Inodes for every name plus the reserved first eleven, lost+found and special files debugfs adds.
  const inodes = plan.inodes + 32;
  let blocks = estimateBlocks(plan.blocks, inodes);
  const uuid = uuidFrom(seed);
  for (let attempt = 0; ; attempt++) {
    await fs.rm(file, { force: true });
    const fh = await fs.open(file, 'wx', 0o644);
    await fh.truncate(blocks * BLOCK_BYTES);
    await fh.close();
    const args = [
      '-q',
      '-F',
      '-t',
      'ext4',
      '-b',
      String(BLOCK_BYTES),
      '-I',
      String(INODE_BYTES),
      '-N',
      String(inodes),
      '-m',
      '0',
      '-O',
      '^has_journal,^resize_inode',
      '-U',
      uuid,
      '-E',
      `hash_seed=${uuid},root_owner=0:0,no_copy_xattrs,lazy_itable_init=1,nodiscard`,
      '-d',
      staging,
      file,
    ];
    try {
      await run('mke2fs', args, plan.epoch, signal);
      return;
    } catch (err) {
      const full = /allocate|no free space|no space left|not enough space/i.test((err as Error).message);
      if (!full || attempt >= 3 || signal?.aborted) throw err;
      blocks = Math.ceil(blocks * 1.25) + 1024;
    }
  }
}

function estimateBlocks(contentBlocks: number, inodes: number): number {
  let blocks = Math.ceil(contentBlocks) + Math.ceil((inodes * INODE_BYTES) / BLOCK_BYTES) + 64;
  const groups = Math.ceil(blocks / BLOCKS_PER_GROUP);
  // Per group: two bitmaps; backups of the superblock and descriptors in groups 0, 1 and powers of 3, 5 and 7.
  const descriptorBlocks = Math.ceil((groups * 64) / BLOCK_BYTES);
  let backups = 0;
  for (const base of [3, 5, 7]) for (let g = base; g < groups; g *= base) backups++;
  blocks += groups * 2 + (Math.min(groups, 2) + backups) * (1 + descriptorBlocks);
  return Math.ceil(blocks * 1.02) + 256;
}

function uuidFrom(seed: Buffer): string {
  const b = Buffer.from(seed.subarray(0, 16));
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const hex = b.toString('hex');
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const MAX_STDERR_BYTES = 64 * 1024;

/** Runs an e2fsprogs tool with its clock pinned to `epoch`, so the same layers give the same bytes. */
export async function run(command: string, args: string[], epoch: number, signal: AbortSignal | undefined): Promise<{ stderr: string }> {
  // Ordinary users often lack /usr/sbin on PATH, which is where Debian keeps e2fsprogs.
  const env = { ...process.env, PATH: `${process.env['PATH'] ?? ''}:/usr/sbin:/sbin`, E2FSPROGS_FAKE_TIME: String(epoch), LC_ALL: 'C' };
  const child = spawn(command, args, { env, stdio: ['ignore', 'ignore', 'pipe'], ...(signal ? { signal } : {}) });
  let stderr = '';
  child.stderr.setEncoding('utf8');
  child.stderr.on('data', (chunk: string) => {
    if (stderr.length < MAX_STDERR_BYTES) stderr += chunk;
  });
  const code = await new Promise<number | null>((resolve, reject) => {
    child.once('error', reject);
    child.once('close', resolve);
  }).catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new AegisError('UNAVAILABLE', `${command} is not installed; install e2fsprogs`);
    throw err;
  });
  if (code !== 0) throw new AegisError('INTERNAL', `${command} failed (exit ${code}): ${stderr.trim().slice(0, 2000)}`);
  return { stderr };
}
