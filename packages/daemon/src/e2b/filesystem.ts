/**
 * envd's Filesystem service over the guest file service (`Instance.files`, as the files API
 * and `aegis cp` use it). Rename has no file-service operation: it runs `mv -T` in the guest as
 * the caller's user. Watching is done from the host by listing the directory every
 * WATCH_POLL_MS and comparing (the guest agent has no inotify): a change shows up within that
 * time, a rename appears as remove + create, and a change that is undone between two looks is
 * not seen.
 */
import type { HandlerContext, ServiceImpl } from '@connectrpc/connect';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { AegisError, isAegisError, type FileStat } from '@aegis/protocol';
import type { DaemonContext } from '../daemon.js';
import type { Instance } from '../instances/instance.js';
import { readEntries } from '../instances/files.js';
import { Channel } from './channel.js';
import { connectError } from './errors.js';
import { guestPath, sandboxInstance, SANDBOX_ID_HEADER, userOf } from './context.js';
import { EventType, FileType, Filesystem, type EntryInfoSchema, type FilesystemEventSchema } from './gen/filesystem/filesystem_pb.js';

export type EntryInit = MessageInitShape<typeof EntryInfoSchema>;
type EventInit = MessageInitShape<typeof FilesystemEventSchema>;

export const WATCH_POLL_MS = 250;
/** A recursive watch looks at no more entries than this. */
const WATCH_MAX_ENTRIES = 20_000;

function typeOf(t: FileStat['type']): FileType {
  return t === 'file' ? FileType.FILE : t === 'directory' ? FileType.DIRECTORY : t === 'symlink' ? FileType.SYMLINK : FileType.UNSPECIFIED;
}

/** `ls -l`'s permission string, as envd gives it. */
export function permissions(type: FileStat['type'], mode: number): string {
  const t = type === 'directory' ? 'd' : type === 'symlink' ? 'L' : '-';
  const bits = 'rwxrwxrwx';
  let s = '';
  for (let i = 0; i < 9; i++) s += mode & (1 << (8 - i)) ? bits[i] : '-';
  return t + s;
}

function owner(id: number): string {
  return id === 0 ? 'root' : String(id);
}

/** envd's EntryInfo for a stat of `full`. */
export function entryOf(stat: FileStat, full: string): EntryInit {
  return {
    name: stat.name,
    type: typeOf(stat.type),
    path: full,
    size: BigInt(stat.size),
    mode: stat.mode & 0o777,
    permissions: permissions(stat.type, stat.mode),
    owner: owner(stat.uid),
    group: owner(stat.gid),
    modifiedTime: { seconds: BigInt(Math.floor(stat.mtimeMs / 1000)), nanos: (stat.mtimeMs % 1000) * 1_000_000 },
    // envd gives the target as an absolute path.
    ...(stat.linkTarget !== undefined ? { symlinkTarget: path.posix.resolve(path.posix.dirname(full), stat.linkTarget) } : {}),
  };
}

export async function statPath(instance: Instance, p: string, signal?: AbortSignal): Promise<FileStat> {
  const { stat, data } = await instance.files({ op: 'stat', path: p }, undefined, signal);
  data.resume();
  if (!stat) throw new AegisError('INTERNAL', 'the guest answered stat without one');
  return stat;
}

export async function listPath(instance: Instance, p: string, signal?: AbortSignal): Promise<FileStat[]> {
  const { data } = await instance.files({ op: 'list', path: p }, undefined, signal);
  return readEntries(data);
}

export async function makeDirs(instance: Instance, p: string, signal?: AbortSignal): Promise<FileStat | undefined> {
  const { stat, data } = await instance.files({ op: 'mkdir', path: p, parents: true }, undefined, signal);
  data.resume();
  return stat;
}

/** Entries of `dir` down to `depth` levels (1: its own entries), directories before their contents. */
export async function listDeep(
  instance: Instance,
  dir: string,
  depth: number,
  signal?: AbortSignal,
  max = Infinity,
): Promise<Array<{ stat: FileStat; full: string }>> {
  const out: Array<{ stat: FileStat; full: string }> = [];
  const walk = async (at: string, level: number): Promise<void> => {
    for (const stat of await listPath(instance, at, signal)) {
      if (out.length >= max) return;
      const full = path.posix.join(at, stat.name);
      out.push({ stat, full });
      if (stat.type === 'directory' && level < depth) {
        // A directory removed meanwhile is simply not listed.
        await walk(full, level + 1).catch((err: unknown) => {
          if (!isAegisError(err, 'NOT_FOUND')) throw err;
        });
      }
    }
  };
  await walk(dir, 1);
  return out;
}

/** Runs argv in the guest; its stderr when it fails, mapped to a code. */
async function run(instance: Instance, command: string[], user: string | undefined): Promise<void> {
  let stderr = '';
  let exit: { exitCode: number | null; signal: string | null } | undefined;
  await instance.exec({ command, ...(user !== undefined ? { user } : {}) }, (ev) => {
    if (ev.type === 'output' && ev.stream === 'stderr' && stderr.length < 4096) stderr += Buffer.from(ev.data, 'base64').toString('utf8');
    if (ev.type === 'exit') exit = ev;
  });
  if (exit?.exitCode === 0) return;
  const msg = stderr.trim() || `${command[0] ?? ''} failed`;
  if (/No such file or directory/.test(msg)) throw new AegisError('NOT_FOUND', msg);
  if (/Permission denied/.test(msg)) throw new AegisError('FAILED_PRECONDITION', msg);
  throw new AegisError('INVALID_ARGUMENT', msg);
}

interface Seen {
  type: FileStat['type'];
  size: number;
  mtimeMs: number;
  mode: number;
}

/** Watches `dir` by polling; calls `emit` with each change; `stop()` ends it. */
export class DirPoller {
  private seen: Map<string, { seen: Seen; stat: FileStat; full: string }> | undefined;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(
    private readonly instance: Instance,
    private readonly dir: string,
    private readonly recursive: boolean,
    private readonly includeEntry: boolean,
    private readonly emit: (ev: EventInit) => void,
    private readonly onGone: (err: unknown) => void,
  ) {}

  private async look(): Promise<Map<string, { seen: Seen; stat: FileStat; full: string }>> {
    const entries = await listDeep(this.instance, this.dir, this.recursive ? 64 : 1, undefined, WATCH_MAX_ENTRIES);
    return new Map(
      entries.map(({ stat, full }) => [
        path.posix.relative(this.dir, full),
        { seen: { type: stat.type, size: stat.size, mtimeMs: stat.mtimeMs, mode: stat.mode }, stat, full },
      ]),
    );
  }

  /** Takes the first look (NOT_FOUND when the directory is missing), then polls. */
  async start(): Promise<void> {
    const st = await statPath(this.instance, this.dir);
    if (st.type !== 'directory') throw new AegisError('INVALID_ARGUMENT', `${this.dir} is not a directory`);
    this.seen = await this.look();
    this.schedule();
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.tick(), WATCH_POLL_MS);
  }

  private async tick(): Promise<void> {
    if (this.stopped) return;
    let now: Map<string, { seen: Seen; stat: FileStat; full: string }>;
    try {
      now = await this.look();
    } catch (err) {
      this.stop();
      this.onGone(err);
      return;
    }
    const before = this.seen ?? new Map();
    const ev = (name: string, type: EventType, e?: { stat: FileStat; full: string }): void =>
      this.emit({ name, type, ...(this.includeEntry && e ? { entry: entryOf(e.stat, e.full) } : {}) });
    for (const [name, e] of now) {
      const old = before.get(name);
      if (!old || old.seen.type !== e.seen.type) {
        ev(name, EventType.CREATE, e);
        // A file that appeared with content was written too: inotify (envd's source) says both.
        if (e.seen.type === 'file' && e.seen.size > 0) ev(name, EventType.WRITE, e);
      } else if (old.seen.size !== e.seen.size || old.seen.mtimeMs !== e.seen.mtimeMs) ev(name, EventType.WRITE, e);
      else if (old.seen.mode !== e.seen.mode) ev(name, EventType.CHMOD, e);
    }
    for (const name of before.keys()) if (!now.has(name)) ev(name, EventType.REMOVE);
    this.seen = now;
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
  }
}

export function filesystemService(d: DaemonContext): ServiceImpl<typeof Filesystem> {
  const watchers = new Map<string, { instanceId: string; poller: DirPoller; events: EventInit[]; error?: unknown }>();
  const ctxOf = (ctx: HandlerContext): { instance: Instance; user: string | undefined } => ({
    instance: sandboxInstance(d, ctx.requestHeader.get(SANDBOX_ID_HEADER)),
    user: userOf(ctx.requestHeader.get('authorization')),
  });
  const wrap = async <T>(f: () => Promise<T>): Promise<T> => {
    try {
      return await f();
    } catch (err) {
      throw connectError(err);
    }
  };

  return {
    stat(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const p = guestPath(req.path, user);
        return { entry: entryOf(await statPath(instance, p, ctx.signal), p) };
      });
    },

    makeDir(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const p = guestPath(req.path, user);
        const existing = await statPath(instance, p, ctx.signal).catch((err: unknown) => {
          if (isAegisError(err, 'NOT_FOUND')) return undefined;
          throw err;
        });
        if (existing) throw new AegisError('ALREADY_EXISTS', `${p} already exists`);
        const stat = (await makeDirs(instance, p, ctx.signal)) ?? (await statPath(instance, p, ctx.signal));
        return { entry: entryOf(stat, p) };
      });
    },

    move(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const from = guestPath(req.source, user);
        const to = guestPath(req.destination, user);
        await statPath(instance, from, ctx.signal);
        await run(instance, ['mv', '-T', '-f', '--', from, to], user);
        return { entry: entryOf(await statPath(instance, to, ctx.signal), to) };
      });
    },

    listDir(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const p = guestPath(req.path, user);
        const st = await statPath(instance, p, ctx.signal);
        if (st.type !== 'directory') throw new AegisError('INVALID_ARGUMENT', `${p} is not a directory`);
        const entries = await listDeep(instance, p, Math.max(1, req.depth), ctx.signal);
        return { entries: entries.map(({ stat, full }) => entryOf(stat, full)) };
      });
    },

    remove(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const p = guestPath(req.path, user);
        // As envd: removing what is not there succeeds.
        await instance
          .files({ op: 'remove', path: p, recursive: true }, undefined, ctx.signal)
          .then(({ data }) => data.resume())
          .catch((err: unknown) => {
            if (!isAegisError(err, 'NOT_FOUND')) throw err;
          });
        return {};
      });
    },

    async *watchDir(req, ctx) {
      const chan = new Channel<EventInit>();
      let poller: DirPoller;
      try {
        const { instance, user } = ctxOf(ctx);
        poller = new DirPoller(
          instance,
          guestPath(req.path, user),
          req.recursive,
          req.includeEntry,
          (ev) => chan.push(ev),
          (err) => chan.end(connectError(err)),
        );
        await poller.start();
      } catch (err) {
        throw connectError(err);
      }
      const keepalive = Number(ctx.requestHeader.get('keepalive-ping-interval'));
      const ping = keepalive > 0 ? setInterval(() => chan.push({ name: '', type: EventType.UNSPECIFIED }), keepalive * 1000) : undefined;
      const onAbort = (): void => chan.end();
      ctx.signal.addEventListener('abort', onAbort, { once: true });
      try {
        yield { event: { case: 'start', value: {} } };
        for await (const ev of chan) {
          if (ev.type === EventType.UNSPECIFIED) yield { event: { case: 'keepalive', value: {} } };
          else yield { event: { case: 'filesystem', value: ev } };
        }
      } finally {
        poller.stop();
        if (ping) clearInterval(ping);
        ctx.signal.removeEventListener('abort', onAbort);
      }
    },

    createWatcher(req, ctx) {
      return wrap(async () => {
        const { instance, user } = ctxOf(ctx);
        const id = randomBytes(8).toString('hex');
        const w: { instanceId: string; poller: DirPoller; events: EventInit[]; error?: unknown } = {
          instanceId: instance.id,
          events: [],
          poller: new DirPoller(
            instance,
            guestPath(req.path, user),
            req.recursive,
            req.includeEntry,
            (ev) => {
              if (w.events.length < 100_000) w.events.push(ev);
            },
            (err) => (w.error = err),
          ),
        };
        await w.poller.start();
        watchers.set(id, w);
        return { watcherId: id };
      });
    },

    getWatcherEvents(req, ctx) {
      return wrap(async () => {
        const { instance } = ctxOf(ctx);
        const w = watchers.get(req.watcherId);
        if (!w || w.instanceId !== instance.id) throw new AegisError('NOT_FOUND', `watcher ${req.watcherId} not found`);
        const events = w.events.splice(0);
        if (events.length === 0 && w.error !== undefined) {
          watchers.delete(req.watcherId);
          throw w.error;
        }
        return { events };
      });
    },

    removeWatcher(req, ctx) {
      return wrap(async () => {
        const { instance } = ctxOf(ctx);
        const w = watchers.get(req.watcherId);
        if (!w || w.instanceId !== instance.id) throw new AegisError('NOT_FOUND', `watcher ${req.watcherId} not found`);
        w.poller.stop();
        watchers.delete(req.watcherId);
        return {};
      });
    },
  };
}
