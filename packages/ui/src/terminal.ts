/**
 * The in-browser terminal: xterm.js on a WebSocket that aegisd bridges to an interactive exec
 * (`/ws/exec`, packages/daemon/src/ui/exec-bridge.ts). Keystrokes go as binary frames, size
 * changes as `{"type":"resize"}`; output comes as binary frames, the end as a JSON text frame.
 */
import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';

export interface TerminalSession {
  close(): void;
}

export function openTerminal(host: HTMLElement, instanceId: string): TerminalSession {
  const term = new Terminal({ fontSize: 13, cursorBlink: true, convertEol: false, scrollback: 5000 });
  const fit = new FitAddon();
  term.loadAddon(fit);
  term.open(host);
  fit.fit();
  const mark = (): void => {
    // The size the guest was told, for anyone checking (the browser tests do).
    host.dataset['rows'] = String(term.rows);
    host.dataset['cols'] = String(term.cols);
  };
  mark();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(
    `${scheme}://${location.host}/ws/exec?instance=${encodeURIComponent(instanceId)}&rows=${term.rows}&cols=${term.cols}`,
  );
  ws.binaryType = 'arraybuffer';
  const encoder = new TextEncoder();
  ws.onopen = () => {
    host.dataset['state'] = 'open';
    term.focus();
  };
  ws.onmessage = (ev: MessageEvent<ArrayBuffer | string>) => {
    if (typeof ev.data !== 'string') {
      term.write(new Uint8Array(ev.data));
      return;
    }
    const msg = JSON.parse(ev.data) as { type: string; exitCode?: number | null; message?: string; code?: string };
    if (msg.type === 'exit') term.write(`\r\n\x1b[2m[exited ${msg.exitCode ?? 'by signal'}]\x1b[0m\r\n`);
    else if (msg.type === 'error') term.write(`\r\n\x1b[31m[${msg.code ?? 'ERROR'}] ${msg.message ?? ''}\x1b[0m\r\n`);
  };
  ws.onclose = () => {
    host.dataset['state'] = 'closed';
  };
  const input = term.onData((d) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
  });
  const resized = term.onResize(({ rows, cols }) => {
    mark();
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: 'resize', rows, cols }));
  });
  // The terminal follows its box (window resizes, layout changes).
  const observer = new ResizeObserver(() => fit.fit());
  observer.observe(host);
  return {
    close() {
      observer.disconnect();
      input.dispose();
      resized.dispose();
      ws.close();
      term.dispose();
    },
  };
}
