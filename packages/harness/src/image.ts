/**
 * Processes inside the instance's OCI image root (/aegis/image, mounted by aegis-init): who
 * they run as (the image's `User`, resolved in the image's own /etc/passwd and /etc/group, as
 * Docker does), where their command is, and the argv that enters the root
 * (`aegis-init chroot ROOT UID GID GROUPS CWD -- CMD`). The harness itself stays in our root:
 * the image needs no shell, libc or anything else of ours.
 */
import { mkdir, readFile, readlink, lstat, stat } from 'node:fs/promises';
import path from 'node:path';
import { AegisError } from '@aegis/protocol';

export const IMAGE_ROOT = '/aegis/image';
const INIT = '/aegis/init';
/** Docker's PATH for a container whose image sets none. */
export const DEFAULT_IMAGE_PATH = '/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin';

export interface ImageUser {
  uid: number;
  gid: number;
  groups: number[];
  home: string;
}

interface Entry {
  name: string;
  id: number;
  gid: number;
  home: string;
  members: string[];
}

async function table(root: string, file: string, kind: 'passwd' | 'group'): Promise<Entry[]> {
  const text = await readFile(path.join(root, 'etc', file), 'utf8').catch(() => '');
  return text.split('\n').flatMap((line) => {
    const f = line.split(':');
    const id = Number(f[2]);
    if (!f[0] || !Number.isInteger(id)) return [];
    return kind === 'passwd'
      ? [{ name: f[0], id, gid: Number(f[3]) || 0, home: f[5] || '/', members: [] }]
      : [{ name: f[0], id, gid: id, home: '', members: (f[3] ?? '').split(',').filter(Boolean) }];
  });
}

const numeric = (s: string): number | undefined => (/^\d{1,10}$/.test(s) ? Number(s) : undefined);

/** `name`, `uid`, `name:group`, `uid:gid` — as the image's config or `--user` gives it — in `root`'s files. */
export async function resolveUser(spec: string | undefined, root = IMAGE_ROOT): Promise<ImageUser> {
  const [userPart = '', groupPart] = (spec ?? '').split(':', 2);
  const passwd = await table(root, 'passwd', 'passwd');
  const groups = await table(root, 'group', 'group');
  const where = root === IMAGE_ROOT ? "the image's" : "the guest's";
  let uid: number;
  let gid: number;
  let home = '/';
  let name: string | undefined;
  const byId = numeric(userPart || '0');
  const entry = byId !== undefined ? passwd.find((e) => e.id === byId) : passwd.find((e) => e.name === userPart);
  if (entry) {
    ({ id: uid, gid, home, name } = entry);
  } else if (byId !== undefined) {
    uid = byId;
    gid = 0;
  } else {
    throw new AegisError('INVALID_ARGUMENT', `unable to find user ${userPart}: no matching entries in ${where} /etc/passwd`);
  }
  if (groupPart !== undefined && groupPart !== '') {
    const g = numeric(groupPart) ?? groups.find((e) => e.name === groupPart)?.id;
    if (g === undefined) throw new AegisError('INVALID_ARGUMENT', `unable to find group ${groupPart} in ${where} /etc/group`);
    gid = g;
  }
  const extra = name === undefined ? [] : groups.filter((g) => g.members.includes(name)).map((g) => g.id);
  return { uid, gid, groups: [...new Set([gid, ...extra])], home };
}

/** Resolves `p` inside `root` as the kernel would after chroot (symlinks stay inside). */
export async function resolveInRoot(root: string, p: string): Promise<string | undefined> {
  let parts = p.split('/').filter((x) => x && x !== '.');
  let done: string[] = [];
  for (let hops = 0; parts.length > 0;) {
    const next = parts.shift() as string;
    if (next === '..') {
      done.pop();
      continue;
    }
    const host = path.join(root, ...done, next);
    const st = await lstat(host).catch(() => undefined);
    if (!st) return undefined;
    if (st.isSymbolicLink()) {
      if (++hops > 40) return undefined;
      const target = await readlink(host);
      parts = [...target.split('/').filter((x) => x && x !== '.'), ...parts];
      if (target.startsWith('/')) done = [];
      continue;
    }
    done.push(next);
  }
  return path.join(root, ...done);
}

async function isExecutableFile(root: string, p: string): Promise<boolean> {
  const real = await resolveInRoot(root, p);
  const st = real ? await stat(real).catch(() => undefined) : undefined;
  return st !== undefined && st.isFile() && (st.mode & 0o111) !== 0;
}

/** NOT_FOUND before anything starts, as for a command missing from our own root. */
async function checkCommand(root: string, file: string, pathVar: string, cwd: string): Promise<void> {
  const found = file.includes('/')
    ? await isExecutableFile(root, path.posix.resolve(cwd, file))
    : (await Promise.all(pathVar.split(':').map((dir) => isExecutableFile(root, path.posix.join(dir || '/', file))))).some(Boolean);
  if (!found) throw new AegisError('NOT_FOUND', `command not found${root === IMAGE_ROOT ? ' in the image' : ''}: ${file}`);
}

/** Docker creates a missing working directory; so do we (in an image, it lands in the instance's layer). */
export async function ensureWorkdir(root: string, cwd: string): Promise<void> {
  const real = await resolveInRoot(root, cwd);
  if (!real) await mkdir(path.join(root, cwd), { recursive: true });
  else if (!(await stat(real)).isDirectory()) throw new AegisError('INVALID_ARGUMENT', `workdir ${cwd} is not a directory in the guest`);
}

export interface ImageLaunch {
  /** argv that enters the image root and runs the command there. */
  argv: string[];
  env: Record<string, string>;
}

/**
 * The argv that runs `command` in `root` (the image's, or `/` for a user switch in ours) as
 * `user`, in `workdir`, created when missing.
 */
export async function rootLaunch(
  root: string,
  command: string[],
  env: Record<string, string>,
  workdir: string | undefined,
  user: string | undefined,
  defaultEnv: Record<string, string>,
): Promise<ImageLaunch> {
  if (root === IMAGE_ROOT && !(await stat(path.join(IMAGE_ROOT, 'proc')).catch(() => undefined))) {
    throw new AegisError('FAILED_PRECONDITION', 'this VM has no image root mounted');
  }
  const u = await resolveUser(user, root);
  const fullEnv: Record<string, string> = { ...defaultEnv, HOME: u.home, ...env };
  const [file] = command;
  if (file === undefined) throw new AegisError('INVALID_ARGUMENT', 'command is empty');
  const cwd = path.posix.resolve('/', workdir ?? '/');
  await ensureWorkdir(root, cwd);
  await checkCommand(root, file, fullEnv['PATH'] ?? DEFAULT_IMAGE_PATH, cwd);
  const groups = u.groups.length > 0 ? u.groups.join(',') : '-';
  return {
    argv: [INIT, 'chroot', root, String(u.uid), String(u.gid), groups, cwd, '--', ...command],
    env: fullEnv,
  };
}
