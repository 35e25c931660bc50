/**
 * Processes inside the instance's OCI image root (/aegis/image, mounted by aegis-init): who
 * they run as (the image's `User`, resolved in the image's own /etc/passwd and /etc/group, as
 * Docker does), where their command is, and the argv that enters the root
 * (`aegis-init chroot ROOT UID GID GROUPS CWD -- CMD`). The harness itself stays in our root:
 * the image needs no shell, libc or anything else of ours.
 */
import { mkdir, readFile, readlink, lstat, stat } from 'node:fs/promises';
import path from 'node:path';
import { AegisError, type ImageContext } from '@aegis/protocol';

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

async function table(file: string, kind: 'passwd' | 'group'): Promise<Entry[]> {
  const text = await readFile(path.join(IMAGE_ROOT, 'etc', file), 'utf8').catch(() => '');
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

/** `name`, `uid`, `name:group`, `uid:gid` — as the image's config or `--user` gives it. */
export async function resolveUser(spec: string | undefined): Promise<ImageUser> {
  const [userPart = '', groupPart] = (spec ?? '').split(':', 2);
  const passwd = await table('passwd', 'passwd');
  const groups = await table('group', 'group');
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
    throw new AegisError('INVALID_ARGUMENT', `unable to find user ${userPart}: no matching entries in the image's /etc/passwd`);
  }
  if (groupPart !== undefined && groupPart !== '') {
    const g = numeric(groupPart) ?? groups.find((e) => e.name === groupPart)?.id;
    if (g === undefined) throw new AegisError('INVALID_ARGUMENT', `unable to find group ${groupPart} in the image's /etc/group`);
    gid = g;
  }
  const extra = name === undefined ? [] : groups.filter((g) => g.members.includes(name)).map((g) => g.id);
  return { uid, gid, groups: [...new Set([gid, ...extra])], home };
}

/** Resolves `p` inside the image root as the kernel would after chroot (symlinks stay inside). */
async function resolveInRoot(p: string): Promise<string | undefined> {
  let parts = p.split('/').filter((x) => x && x !== '.');
  let done: string[] = [];
  for (let hops = 0; parts.length > 0;) {
    const next = parts.shift() as string;
    if (next === '..') {
      done.pop();
      continue;
    }
    const host = path.join(IMAGE_ROOT, ...done, next);
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
  return path.join(IMAGE_ROOT, ...done);
}

async function isExecutableFile(p: string): Promise<boolean> {
  const real = await resolveInRoot(p);
  const st = real ? await stat(real).catch(() => undefined) : undefined;
  return st !== undefined && st.isFile() && (st.mode & 0o111) !== 0;
}

/** NOT_FOUND before anything starts, as for a command missing from our own root. */
async function checkCommand(file: string, pathVar: string): Promise<void> {
  const found = file.includes('/')
    ? await isExecutableFile(path.posix.resolve('/', file))
    : (await Promise.all(pathVar.split(':').map((dir) => isExecutableFile(path.posix.join(dir || '/', file))))).some(Boolean);
  if (!found) throw new AegisError('NOT_FOUND', `command not found in the image: ${file}`);
}

export interface ImageLaunch {
  /** argv that enters the image root and runs the command there. */
  argv: string[];
  env: Record<string, string>;
}

export async function imageLaunch(
  command: string[],
  env: Record<string, string>,
  workdir: string | undefined,
  ctx: ImageContext,
): Promise<ImageLaunch> {
  if (!(await stat(path.join(IMAGE_ROOT, 'proc')).catch(() => undefined))) {
    throw new AegisError('FAILED_PRECONDITION', 'this VM has no image root mounted');
  }
  const user = await resolveUser(ctx.user);
  const fullEnv = { PATH: DEFAULT_IMAGE_PATH, HOME: user.home, ...env };
  const [file] = command;
  if (file === undefined) throw new AegisError('INVALID_ARGUMENT', 'command is empty');
  await checkCommand(file, fullEnv.PATH);
  const cwd = workdir ?? '/';
  // Docker creates a missing working directory; so do we (it lands in the instance's layer).
  const realCwd = await resolveInRoot(cwd);
  if (!realCwd) await mkdir(path.join(IMAGE_ROOT, cwd), { recursive: true });
  else if (!(await stat(realCwd)).isDirectory()) throw new AegisError('INVALID_ARGUMENT', `workdir ${cwd} is not a directory in the image`);
  const groups = user.groups.length > 0 ? user.groups.join(',') : '-';
  return {
    argv: [INIT, 'chroot', IMAGE_ROOT, String(user.uid), String(user.gid), groups, cwd, '--', ...command],
    env: fullEnv,
  };
}
