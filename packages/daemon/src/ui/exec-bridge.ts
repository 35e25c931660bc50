/**
 * The dashboard's terminal: one WebSocket bridged to one interactive exec of aegisd's API, over
 * the unix socket like any client's (`POST /v1/instances/{ref}/exec` with `tty` and `stdin`,
 * then `…/execs/{id}/input` and `…/resize`). Nothing of the exec machinery is reached directly.
 *
 * Frames, browser to here: binary = keystrokes; text = `{"type":"resize","rows":N,"cols":N}`.
 * Here to browser: binary = terminal output; text = `{"type":"exit",…}` or `{"type":"error",…}`
 * (then the socket closes). The socket closing ends the exec request, and aegisd kills the
 * command's process group as it does for any client that goes away.
 */
import http from 'node:http';
import type { WebSocket } from 'ws';
import { AegisError } from '@aegis/protocol';
import type { ExecEvent } from '@aegis/protocol/api';
import { escapeForLog, type Logger } from '../log.js';

/** The shell the terminal runs: every image and the base rootfs have one. */
const SHELL = ['/bin/sh'];
/** Keystrokes waiting for earlier ones to reach the guest: a paste larger than this is cut. */
const MAX_PENDING_INPUT_BYTES = 1024 * 1024;

function apiCall(socketPath: string, method: string, target: string, body: unknown, signal?: AbortSignal): Promise<http.IncomingMessage> {
  return new Promise((resolve, reject) => {
    const text = JSON.stringify(body);
    const req = http.request(
      {
        socketPath,
        method,
        path: target,
        headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) },
        signal,
      },
      resolve,
    );
    req.on('error', reject);
    req.end(text);
  });
}

/** A small JSON call whose answer is only its status: throws the API's error. */
async function call(socketPath: string, target: string, body: unknown): Promise<void> {
  const res = await apiCall(socketPath, 'POST', target, body);
  let text = '';
  for await (const c of res as AsyncIterable<Buffer>) text += c.toString('utf8');
  if ((res.statusCode ?? 500) >= 300) {
    const e = (() => {
      try {
        return JSON.parse(text) as { code?: string; message?: string };
      } catch {
        return {};
      }
    })();
    throw new AegisError('UNKNOWN', e.message ?? `HTTP ${res.statusCode ?? 0}`);
  }
}

function isSize(v: unknown): v is { rows: number; cols: number } {
  const s = v as { rows?: unknown; cols?: unknown };
  const ok = (n: unknown): boolean => Number.isInteger(n) && (n as number) > 0 && (n as number) <= 1000;
  return typeof v === 'object' && v !== null && ok(s.rows) && ok(s.cols);
}

export function bridgeExec(socketPath: string, ref: string, size: { rows: number; cols: number }, ws: WebSocket, log: Logger): void {
  const controller = new AbortController();
  const base = `/v1/instances/${encodeURIComponent(ref)}`;
  let execId: string | undefined;
  // Input and resizes go in order, one request at a time, after the exec has started.
  let chain: Promise<void> = Promise.resolve();
  let pendingBytes = 0;
  const early: Array<() => Promise<void>> = [];
  const enqueue = (step: () => Promise<void>, bytes = 0): void => {
    if (pendingBytes + bytes > MAX_PENDING_INPUT_BYTES) return;
    pendingBytes += bytes;
    const run = (): void => {
      chain = chain
        .then(step)
        .catch(() => undefined)
        .finally(() => (pendingBytes -= bytes));
    };
    if (execId === undefined) early.push(async () => run());
    else run();
  };
  const sendText = (v: unknown): void => {
    if (ws.readyState === ws.OPEN) ws.send(JSON.stringify(v));
  };

  ws.on('message', (data: Buffer, isBinary: boolean) => {
    if (isBinary) {
      const chunk = Buffer.from(data);
      enqueue(() => call(socketPath, `${base}/execs/${execId ?? ''}/input`, { data: chunk.toString('base64') }), chunk.length);
      return;
    }
    let msg: unknown;
    try {
      msg = JSON.parse(data.toString('utf8'));
    } catch {
      return;
    }
    const m = msg as { type?: unknown };
    if (m.type === 'resize' && isSize(msg)) {
      const { rows, cols } = msg;
      enqueue(() => call(socketPath, `${base}/execs/${execId ?? ''}/resize`, { rows, cols }));
    }
  });
  ws.on('close', () => controller.abort());
  ws.on('error', () => controller.abort());

  void (async () => {
    const tty = isSize(size) ? size : { rows: 24, cols: 80 };
    const res = await apiCall(
      socketPath,
      'POST',
      `${base}/exec`,
      { command: SHELL, stdin: true, tty, env: { TERM: 'xterm-256color' } },
      controller.signal,
    );
    res.setEncoding('utf8');
    let buffered = '';
    const handle = (ev: ExecEvent | { code: string; message: string }): void => {
      if (!('type' in ev)) {
        sendText({ type: 'error', code: ev.code, message: ev.message });
        return;
      }
      if (ev.type === 'started') {
        execId = ev.execId;
        for (const go of early.splice(0)) void go();
      } else if (ev.type === 'output') {
        if (ws.readyState === ws.OPEN) ws.send(Buffer.from(ev.data, 'base64'), { binary: true });
      } else sendText(ev);
    };
    if ((res.statusCode ?? 500) >= 300) {
      let text = '';
      for await (const c of res as AsyncIterable<string>) text += c;
      handle(JSON.parse(text) as { code: string; message: string });
    } else {
      for await (const c of res as AsyncIterable<string>) {
        buffered += c;
        let nl: number;
        while ((nl = buffered.indexOf('\n')) !== -1) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (line.trim() !== '') handle(JSON.parse(line) as ExecEvent);
        }
      }
    }
  })()
    .catch((err: unknown) => {
      if (controller.signal.aborted) return;
      const e = AegisError.from(err);
      log.warn(`ui: terminal on ${escapeForLog(ref, 100)}: ${escapeForLog(e.message)}`);
      sendText({ type: 'error', code: e.code, message: e.message });
    })
    .finally(() => {
      if (ws.readyState === ws.OPEN) ws.close(1000, 'exec ended');
    });
}
