/**
 * Two tabs of one instance's page: its files (a directory listing to walk, download from and
 * upload into) and its egress (the policy, per-destination counters and the latest decisions).
 */
import { useEffect, useState } from 'preact/hooks';
import { html } from 'htm/preact';
import type { EgressView, FileStat } from '@aegis/protocol/api';
import { ApiError, call, ref } from './api.js';

type Child = ReturnType<typeof html>;
type Report = (err: unknown) => void;

const parentOf = (dir: string): string => dir.replace(/\/[^/]+\/?$/, '') || '/';
const join = (dir: string, name: string): string => `${dir.replace(/\/$/, '')}/${name}`;
const fileUrl = (id: string, p: string): string => `/api/v1/instances/${ref(id)}/files?path=${encodeURIComponent(p)}`;

function size(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1048576) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1048576).toFixed(1)} MiB`;
}

/** A directory of the guest: entries to open (directories) or download (files), and an upload into it. */
export function Files({ id, report }: { id: string; report: Report }): Child {
  const [dir, setDir] = useState('/root');
  const [typed, setTyped] = useState('/root');
  const [entries, setEntries] = useState<FileStat[] | undefined>();
  const [done, setDone] = useState('');
  const [generation, setGeneration] = useState(0);
  useEffect(() => {
    setEntries(undefined);
    call<{ entries: FileStat[] }>('GET', `/v1/instances/${ref(id)}/files/list?path=${encodeURIComponent(dir)}`).then(
      (r) =>
        setEntries(
          [...r.entries].sort((a, b) => Number(b.type === 'directory') - Number(a.type === 'directory') || a.name.localeCompare(b.name)),
        ),
      (err: unknown) => {
        setEntries([]);
        report(err);
      },
    );
  }, [id, dir, generation]);
  const open = (p: string): void => {
    setDir(p);
    setTyped(p);
  };
  const upload = async (e: Event): Promise<void> => {
    const f = (e.target as HTMLInputElement).files?.[0];
    if (!f) return;
    const dest = join(dir, f.name);
    const res = await fetch(fileUrl(id, dest), { method: 'PUT', body: f });
    if (!res.ok)
      report(new ApiError(((await res.json().catch(() => ({}))) as { code?: string }).code ?? 'UNKNOWN', `upload to ${dest} failed`));
    else {
      setDone(`uploaded ${f.name} (${f.size} bytes) to ${dest}`);
      setGeneration((g) => g + 1);
    }
  };
  return html`<div class="files">
    <div class="toolbar">
      <button onClick=${() => open(parentOf(dir))} disabled=${dir === '/'}>Up</button>
      <input
        class="path mono"
        value=${typed}
        onInput=${(e: Event) => setTyped((e.target as HTMLInputElement).value)}
        onKeyDown=${(e: KeyboardEvent) => e.key === 'Enter' && open(typed || '/')}
      />
      <label class="button">Upload here…<input type="file" hidden onChange=${upload} /></label>
      <span class="dim">${done}</span>
    </div>
    <table class="listing">
      <thead>
        <tr>
          <th>Name</th>
          <th>Size</th>
          <th>Mode</th>
          <th>Modified</th>
        </tr>
      </thead>
      <tbody>
        ${(entries ?? []).map(
          (e) =>
            html`<tr data-name=${e.name} data-type=${e.type}>
              <td class="mono">
                ${
                  e.type === 'directory'
                    ? html`<button class="link" onClick=${() => open(join(dir, e.name))}>${e.name}/</button>`
                    : e.type === 'file'
                      ? html`<a href=${fileUrl(id, join(dir, e.name))} download=${e.name}>${e.name}</a>`
                      : html`${e.name}${e.linkTarget ? html` <span class="dim">→ ${e.linkTarget}</span>` : null}`
                }
              </td>
              <td>${e.type === 'file' ? size(e.size) : ''}</td>
              <td class="mono dim">${(e.mode & 0o7777).toString(8).padStart(4, '0')}</td>
              <td class="dim">${new Date(e.mtimeMs).toLocaleString()}</td>
            </tr>`,
        )}
      </tbody>
    </table>
    ${entries === undefined ? html`<p class="dim">loading…</p>` : entries.length === 0 ? html`<p class="dim">(empty)</p>` : null}
  </div>`;
}

/** The instance's egress: what it may reach, what it reached, and what was refused, refreshed every 2 s. */
export function Egress({ id, report }: { id: string; report: Report }): Child {
  const [view, setView] = useState<EgressView | undefined>();
  useEffect(() => {
    let stopped = false;
    const load = (): void => {
      call<EgressView>('GET', `/v1/instances/${ref(id)}/egress?log=1`).then(
        (v) => !stopped && setView(v),
        (err: unknown) => !stopped && report(err),
      );
    };
    load();
    const timer = setInterval(load, 2000);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, [id]);
  if (!view) return html`<p class="dim">loading…</p>`;
  if (view.mode === 'off') return html`<p class="dim egress-off">No egress policy: network ${view.network}.</p>`;
  const log = [...(view.log ?? [])].reverse().slice(0, 200);
  return html`<div class="egress">
    <dl class="facts">
      <dt>mode</dt>
      <dd>${view.mode === 'allow-list' ? 'allow-list (everything else denied)' : 'default (public internet; private ranges refused)'}</dd>
      <dt>allow</dt>
      <dd class="mono">${view.allow.join(', ') || '—'}</dd>
      <dt>deny</dt>
      <dd class="mono">${view.deny.join(', ') || '—'}</dd>
    </dl>
    <h3>Destinations</h3>
    <table class="counters">
      <thead>
        <tr>
          <th>Destination</th>
          <th>Allowed</th>
          <th>Denied</th>
          <th>Out</th>
          <th>In</th>
        </tr>
      </thead>
      <tbody>
        ${view.counters.map(
          (c) =>
            html`<tr data-destination=${c.destination}>
              <td class="mono">${c.destination}</td>
              <td>${c.allowed}</td>
              <td class=${c.denied > 0 ? 'denied' : ''}>${c.denied}</td>
              <td>${size(c.bytesOut)}</td>
              <td>${size(c.bytesIn)}</td>
            </tr>`,
        )}
      </tbody>
    </table>
    <h3>Latest decisions</h3>
    <table class="decisions">
      <tbody>
        ${log.map(
          (d) =>
            html`<tr class=${d.allowed ? '' : 'denied'} data-allowed=${String(d.allowed)}>
              <td class="dim">${new Date(d.timeMs).toLocaleTimeString()}</td>
              <td>${d.kind}</td>
              <td class="mono">${[d.name, d.address].filter(Boolean).join(' ')}${d.port ? `:${d.port}` : ''}</td>
              <td>${d.allowed ? 'allowed' : 'denied'}</td>
              <td class="dim">${d.reason}</td>
            </tr>`,
        )}
      </tbody>
    </table>
  </div>`;
}
