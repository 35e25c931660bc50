/**
 * The dashboard's pages (hash-routed: `#/`, `#/i/<id>`, `#/images`, `#/daemon`). Live state
 * comes from the API's event stream (`GET /v1/events?follow`): a lifecycle event makes the page
 * re-read that one instance, so nothing polls for changes. Only the stats chart samples
 * (`/stats` is a measurement, not a state).
 */
import '@xterm/xterm/css/xterm.css';
import 'uplot/dist/uPlot.min.css';
import './style.css';
import { render } from 'preact';
import { useEffect, useMemo, useRef, useState } from 'preact/hooks';
import { html } from 'htm/preact';
import uPlot from 'uplot';
import type { Image, Instance, LifecycleEvent, LogEvent, Status } from '@aegis/protocol/api';
import { ApiError, call, decodeBase64, ref, stream } from './api.js';
import { openTerminal } from './terminal.js';
import { useSamples, type Samples } from './samples.js';
import { Egress, Files } from './panels.js';

type Child = ReturnType<typeof html>;

function useRoute(): string {
  const [route, setRoute] = useState(location.hash.slice(1) || '/');
  useEffect(() => {
    const on = (): void => setRoute(location.hash.slice(1) || '/');
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}

/** Errors shown at the top of the page, one line each with their code. */
let showError: (msg: string) => void = () => undefined;
const report = (err: unknown): void => showError(err instanceof ApiError ? `[${err.code}] ${err.message}` : String(err));

/**
 * The instances, kept current by the event stream. The stream starts a few seconds back
 * (`since`), so that a change between the list and the subscription is not missed (a replayed
 * one only re-reads an instance); after a reconnect it resumes after the last event seen
 * (`after`). A change re-reads that instance; a delete drops it.
 */
/** An instance as far as a lifecycle event tells it (the state after it; for a new one, what create says). */
function provisional(known: Instance | undefined, e: LifecycleEvent): Instance {
  if (known) return { ...known, ...(e.state ? { state: e.state } : {}) };
  return {
    id: e.instanceId ?? '',
    handle: e.handle ?? '',
    state: e.state ?? 'starting',
    command: [],
    createdAt: new Date(e.timeMs).toISOString(),
    memoryMiB: 0,
    vcpuCount: 0,
    exitCode: null,
    ports: [],
    network: 'none',
    volumes: [],
    ...(e.labels ? { labels: e.labels } : {}),
  };
}

/** How far back the first subscription starts. */
const REPLAY_MS = 5000;

function useInstances(): { list: Instance[]; live: boolean } {
  const [byId, setById] = useState<Map<string, Instance>>(new Map());
  const [live, setLive] = useState(false);
  useEffect(() => {
    const abort = new AbortController();
    let lastSeq = 0;
    const refresh = async (id: string): Promise<void> => {
      try {
        const v = await call<Instance>('GET', `/v1/instances/${ref(id)}`);
        setById((m) => new Map(m).set(v.id, v));
      } catch (err) {
        if (err instanceof ApiError && err.code === 'NOT_FOUND')
          setById((m) => {
            const n = new Map(m);
            n.delete(id);
            return n;
          });
      }
    };
    void (async () => {
      for (;;) {
        try {
          const from = lastSeq > 0 ? `after=${lastSeq}` : `since=${Date.now() - REPLAY_MS}`;
          const events = stream<LifecycleEvent | { type: 'error'; message: string }>(`/v1/events?follow=true&${from}`, abort.signal);
          const first = events.next();
          const list = await call<{ instances: Instance[] }>('GET', '/v1/instances?all=true');
          setById(new Map(list.instances.map((i) => [i.id, i])));
          setLive(true);
          for (let ev = await first; !ev.done; ev = await events.next()) {
            const e = ev.value;
            if (!('seq' in e)) continue;
            lastSeq = Math.max(lastSeq, e.seq);
            if (e.instanceId === undefined) continue;
            const id = e.instanceId;
            // Shown at once from the event itself; the re-read below fills in the rest.
            if (e.type !== 'delete' && e.state !== undefined) setById((m) => new Map(m).set(id, provisional(m.get(id), e)));
            if (e.type === 'delete')
              setById((m) => {
                const n = new Map(m);
                n.delete(id);
                return n;
              });
            else void refresh(id);
          }
        } catch (err) {
          if (abort.signal.aborted) return;
          report(err);
        }
        setLive(false);
        // The stream ended (aegisd restarting): pick it up again.
        await new Promise((r) => setTimeout(r, 2000));
      }
    })();
    return () => abort.abort();
  }, []);
  const list = [...byId.values()].sort((a, b) => b.createdAt.localeCompare(a.createdAt));
  return { list, live };
}

function StateBadge({ state }: { state: string }): Child {
  return html`<span class=${`badge state-${state}`}>${state}</span>`;
}

function Labels({ labels }: { labels: Record<string, string> | undefined }): Child {
  return html`${Object.entries(labels ?? {}).map(([k, v]) => html`<span class="label">${k}${v !== '' ? `=${v}` : ''}</span>`)}`;
}

function Ports({ i }: { i: Instance }): Child {
  return html`${i.ports.map((p) => {
    const host = p.hostIp === '0.0.0.0' || p.hostIp === '' ? '127.0.0.1' : p.hostIp;
    const url = `http://${host.includes(':') ? `[${host}]` : host}:${p.hostPort}/`;
    return html`<a class="port" href=${url} target="_blank" rel="noopener noreferrer">${p.hostPort}→${p.guestPort}</a>`;
  })}`;
}

/** Start/stop/pause/resume/delete, as far as the state allows. */
function Actions({ i, after }: { i: Instance; after?: () => void }): Child {
  const act = (method: string, path: string, confirmText?: string) => async () => {
    if (confirmText && !confirm(confirmText)) return;
    try {
      await call(method, `/v1/instances/${ref(i.id)}${path}`, method === 'POST' ? {} : undefined);
      after?.();
    } catch (err) {
      report(err);
    }
  };
  const s = i.state;
  const live = s === 'running' || s === 'starting';
  return html`<span class="actions">
    ${live ? html`<button data-action="stop" onClick=${act('POST', '/stop')}>Stop</button>` : null}
    ${s === 'running' ? html`<button data-action="pause" onClick=${act('POST', '/pause')}>Pause</button>` : null}
    ${s === 'paused' || s === 'hibernated' ? html`<button data-action="resume" onClick=${act('POST', '/resume')}>Resume</button>` : null}
    ${s === 'stopped' || s === 'failed' ? html`<button data-action="start" onClick=${act('POST', '/restart')}>Start</button>` : null}
    <button data-action="delete" class="danger" onClick=${act('DELETE', '?force=true', `Delete ${i.handle}?`)}>Delete</button>
  </span>`;
}

/** A small line of the last values, and the latest as text. */
function Sparkline({ values, unit, max }: { values: number[]; unit: string; max?: number }): Child {
  if (values.length === 0) return html`<span class="dim">—</span>`;
  const w = 56;
  const hgt = 20;
  const top = Math.max(max ?? 0, ...values, 1e-9);
  const y = (v: number): number => hgt - (v / top) * (hgt - 2) - 1;
  // One sample is a level line so far.
  const series = values.length === 1 ? [values[0] ?? 0, values[0] ?? 0] : values;
  const points = series.map((v, i) => `${(i / (series.length - 1)) * w},${y(v)}`).join(' ');
  const latest = values[values.length - 1] ?? 0;
  return html`<span class="spark"
    ><svg width=${w} height=${hgt} viewBox=${`0 0 ${w} ${hgt}`}>
      <polyline points=${points} fill="none" stroke="currentColor" stroke-width="1.5" />
    </svg>
    <span>${latest.toFixed(latest < 10 ? 1 : 0)} ${unit}</span></span
  >`;
}

function InstancesPage(): Child {
  const { list, live } = useInstances();
  const samples: Map<string, Samples> = useSamples();
  const [filter, setFilter] = useState('');
  const shown = list.filter(
    (i) => filter === '' || `${i.handle} ${i.id} ${i.image ?? ''} ${JSON.stringify(i.labels ?? {})}`.includes(filter),
  );
  return html`<section>
    <h1>
      Instances
      <span class=${live ? 'live on' : 'live'} title="updates from aegisd's event stream">${live ? '● live' : '○ connecting'}</span>
    </h1>
    <input
      class="search"
      placeholder="filter by name, image, label"
      value=${filter}
      onInput=${(e: Event) => setFilter((e.target as HTMLInputElement).value)}
    />
    <table class="instances">
      <thead>
        <tr>
          <th>Name</th>
          <th>State</th>
          <th>Image</th>
          <th>Command</th>
          <th>CPU</th>
          <th>Memory</th>
          <th>Ports</th>
          <th>Labels</th>
          <th>Created</th>
          <th></th>
        </tr>
      </thead>
      <tbody>
        ${shown.map(
          (i) =>
            html`<tr data-id=${i.id} data-handle=${i.handle} data-state=${i.state}>
              <td>
                <a href=${`#/i/${i.id}`}>${i.handle}</a>
                <div class="dim mono">${i.id.slice(0, 12)}</div>
              </td>
              <td><${StateBadge} state=${i.state} /></td>
              <td class="mono">${i.image ?? 'base'}</td>
              <td><div class="mono cmd" title=${i.command.join(' ')}>${i.command.join(' ')}</div></td>
              <td class="cpu"><${Sparkline} values=${samples.get(i.id)?.cpuPercent ?? []} unit="%" max=${100} /></td>
              <td class="memory"><${Sparkline} values=${samples.get(i.id)?.memoryMiB ?? []} unit="MiB" /></td>
              <td><${Ports} i=${i} /></td>
              <td><${Labels} labels=${i.labels} /></td>
              <td class="dim">${new Date(i.createdAt).toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'short' })}</td>
              <td><${Actions} i=${i} /></td>
            </tr>`,
        )}
      </tbody>
    </table>
    ${shown.length === 0 ? html`<p class="dim">No instances. <code>aegis run -d -- sleep 600</code> makes one.</p>` : null}
  </section>`;
}

/** The instance's output, live: stored output first, then what comes, until it stops. */
function Logs({ id }: { id: string }): Child {
  const [lines, setLines] = useState<Array<{ text: string; stream: string }>>([]);
  const [search, setSearch] = useState('');
  const [follow, setFollow] = useState(true);
  const box = useRef<HTMLPreElement>(null);
  useEffect(() => {
    const abort = new AbortController();
    const decoders = { stdout: new TextDecoder(), stderr: new TextDecoder() };
    const partial = { stdout: '', stderr: '' };
    setLines([]);
    void (async () => {
      try {
        for await (const ev of stream<LogEvent>(`/v1/instances/${ref(id)}/logs?follow=true&execs=true&tail=2000`, abort.signal)) {
          if (ev.type !== 'output') {
            if (ev.type === 'end')
              setLines((l) => [...l, { text: `— ${ev.state}${ev.exitCode !== null ? ` (exit ${ev.exitCode})` : ''} —`, stream: 'meta' }]);
            continue;
          }
          const text = partial[ev.stream] + decodeBase64(ev.data, decoders[ev.stream]);
          const parts = text.split('\n');
          partial[ev.stream] = parts.pop() ?? '';
          if (parts.length > 0) setLines((l) => [...l, ...parts.map((t) => ({ text: t, stream: ev.stream }))].slice(-5000));
        }
      } catch (err) {
        if (!abort.signal.aborted) report(err);
      }
    })();
    return () => abort.abort();
  }, [id]);
  useEffect(() => {
    if (follow && box.current) box.current.scrollTop = box.current.scrollHeight;
  });
  const shown = search === '' ? lines : lines.filter((l) => l.text.toLowerCase().includes(search.toLowerCase()));
  return html`<div class="logs-panel">
    <div class="toolbar">
      <input
        class="search"
        placeholder="search the logs"
        value=${search}
        onInput=${(e: Event) => setSearch((e.target as HTMLInputElement).value)}
      />
      <label
        ><input type="checkbox" checked=${follow} onChange=${(e: Event) => setFollow((e.target as HTMLInputElement).checked)} />
        follow</label
      >
      <span class="dim">${shown.length} of ${lines.length} lines</span>
    </div>
    <pre class="logs" ref=${box}>${shown.map((l) => html`<div class=${`line ${l.stream}`}>${l.text}</div>`)}</pre>
  </div>`;
}

function TerminalPanel({ id }: { id: string }): Child {
  const host = useRef<HTMLDivElement>(null);
  const [session, setSession] = useState(0);
  useEffect(() => {
    if (!host.current) return;
    const t = openTerminal(host.current, id);
    return () => t.close();
  }, [id, session]);
  return html`<div class="terminal-panel">
    <div class="toolbar">
      <span class="dim">/bin/sh in the guest (an exec with a terminal)</span
      ><button onClick=${() => setSession((n) => n + 1)}>New session</button>
    </div>
    <div class="terminal" ref=${host}></div>
  </div>`;
}

/** CPU and memory, sampled from `/stats` every 2 s while the page is open. */
function StatsChart({ id }: { id: string }): Child {
  const host = useRef<HTMLDivElement>(null);
  useEffect(() => {
    if (!host.current) return;
    const data: [number[], Array<number | null>, Array<number | null>] = [[], [], []];
    const plot = new uPlot(
      {
        width: Math.max(300, host.current.clientWidth),
        height: 160,
        series: [{}, { label: 'CPU %', stroke: '#4f8cff', scale: '%' }, { label: 'guest MiB used', stroke: '#2bb673', scale: 'mib' }],
        axes: [{}, { scale: '%' }, { scale: 'mib', side: 1 }],
      },
      data,
      host.current,
    );
    const tick = async (): Promise<void> => {
      try {
        const s = await call<{ cpuPercent: number | null; guestMemoryUsedBytes: number | null }>('GET', `/v1/instances/${ref(id)}/stats`);
        data[0].push(Date.now() / 1000);
        data[1].push(s.cpuPercent);
        data[2].push(s.guestMemoryUsedBytes === null ? null : s.guestMemoryUsedBytes / 1048576);
        if (data[0].length > 150) for (const d of data) d.shift();
        plot.setData(data);
      } catch {
        // Not running: no figures; the chart just pauses.
      }
    };
    void tick();
    const timer = setInterval(() => void tick(), 2000);
    return () => {
      clearInterval(timer);
      plot.destroy();
    };
  }, [id]);
  return html`<div class="chart" ref=${host}></div>`;
}

/** Download a guest file by path, or upload one to a path. */
function InstancePage({ id }: { id: string }): Child {
  const { list } = useInstances();
  const i = list.find((x) => x.id === id || x.handle === id);
  const [tab, setTab] = useState<'logs' | 'terminal' | 'stats' | 'files' | 'egress'>('logs');
  if (!i)
    return html`<section>
      <p class="dim">Instance ${id}: loading, or not there (deleted?). <a href="#/">All instances</a></p>
    </section>`;
  const tabs = ['logs', 'terminal', 'stats', 'files', 'egress'] as const;
  return html`<section data-instance=${i.id}>
    <h1><a href="#/">Instances</a> / ${i.handle} <${StateBadge} state=${i.state} /> <${Actions} i=${i} /></h1>
    <dl class="facts">
      <dt>id</dt>
      <dd class="mono">${i.id}</dd>
      <dt>image</dt>
      <dd class="mono">${i.image ?? 'base'}</dd>
      <dt>command</dt>
      <dd class="mono">${i.command.join(' ')}</dd>
      <dt>machine</dt>
      <dd>${i.vcpuCount} vCPU, ${i.memoryMiB} MiB, network ${i.network}${i.backend ? `, ${i.backend}` : ''}</dd>
      <dt>ports</dt>
      <dd><${Ports} i=${i} /></dd>
      <dt>labels</dt>
      <dd><${Labels} labels=${i.labels} /></dd>
      ${
        i.stateReason
          ? html`<dt>reason</dt>
              <dd>${i.stateReason}</dd>`
          : null
      }
      ${
        i.exitCode !== null
          ? html`<dt>exit code</dt>
              <dd>${i.exitCode}</dd>`
          : null
      }
    </dl>
    <nav class="tabs">
      ${tabs.map((t) => html`<button class=${tab === t ? 'on' : ''} data-tab=${t} onClick=${() => setTab(t)}>${t}</button>`)}
    </nav>
    ${tab === 'logs' ? html`<${Logs} id=${i.id} />` : null} ${tab === 'terminal' ? html`<${TerminalPanel} id=${i.id} />` : null}
    ${tab === 'stats' ? html`<${StatsChart} id=${i.id} />` : null}
    ${tab === 'files' ? html`<${Files} id=${i.id} report=${report} />` : null}
    ${tab === 'egress' ? html`<${Egress} id=${i.id} report=${report} />` : null}
  </section>`;
}

function useLoad<T>(path: string): T | undefined {
  const [v, setV] = useState<T>();
  useEffect(() => {
    call<T>('GET', path).then(setV, report);
  }, [path]);
  return v;
}

const mib = (bytes: number): string => `${(bytes / 1048576).toFixed(1)} MiB`;

function ImagesPage(): Child {
  const images = useLoad<{ images: Image[] }>('/v1/images');
  return html`<section>
    <h1>Images</h1>
    <table>
      <thead>
        <tr>
          <th>Reference</th>
          <th>Digest</th>
          <th>Size</th>
          <th>Filesystem</th>
          <th>Arch</th>
          <th>Stored</th>
        </tr>
      </thead>
      <tbody>
        ${(images?.images ?? []).map(
          (im) =>
            html`<tr>
              <td class="mono">${im.references.join(', ') || '(untagged)'}</td>
              <td class="mono dim">${im.digest.slice(7, 19)}</td>
              <td>${mib(im.sizeBytes)}</td>
              <td>${mib(im.fsBytes)}</td>
              <td>${im.architecture}</td>
              <td class="dim">${new Date(im.storedAt).toLocaleString()}</td>
            </tr>`,
        )}
      </tbody>
    </table>
    ${images && images.images.length === 0 ? html`<p class="dim">No images: instances run the base rootfs. <code>aegis pull alpine</code> adds one.</p>` : null}
  </section>`;
}

function DaemonPage(): Child {
  const status = useLoad<Status>('/v1/status');
  const secrets = useLoad<{ secrets: Array<{ name: string; hosts?: string[] }> }>('/v1/secrets');
  const volumes = useLoad<{ volumes: Array<{ name: string }> }>('/v1/volumes');
  const snapshots = useLoad<{ snapshots: Array<{ name: string }> }>('/v1/snapshots');
  if (!status)
    return html`<section>
      <h1>Daemon</h1>
      <p class="dim">loading…</p>
    </section>`;
  const lag = status.eventLoopDelayMs;
  return html`<section>
    <h1>Daemon</h1>
    <dl class="facts">
      <dt>version</dt>
      <dd>${status.version} (pid ${status.pid}, up ${Math.round(status.uptimeMs / 1000)} s)</dd>
      <dt>home</dt>
      <dd class="mono">${status.home}</dd>
      <dt>backend</dt>
      <dd>${status.backend.name}: ${status.backend.acceleration} — ${status.backend.accelerationReason}</dd>
      <dt>instances</dt>
      <dd>${status.instances.running} running of ${status.instances.total}</dd>
      <dt>event loop lag</dt>
      <dd>p50 ${lag.p50Ms.toFixed(1)} ms, p99 ${lag.p99Ms.toFixed(1)} ms, max ${lag.maxMs.toFixed(1)} ms</dd>
      <dt>warm pool</dt>
      <dd>
        ${status.pool ? `${status.pool.ready} ready (size ${status.pool.size}), ${status.pool.taken} taken, ${status.pool.missed} missed` : 'off'}
      </dd>
      <dt>secrets</dt>
      <dd>
        ${(secrets?.secrets ?? []).map((s) => html`<span class="label">${s.name}</span>`)}
        <span class="dim">(names only: values never leave aegisd)</span>
      </dd>
      <dt>volumes</dt>
      <dd>${(volumes?.volumes ?? []).map((v) => html`<span class="label">${v.name}</span>`)}</dd>
      <dt>snapshots</dt>
      <dd>${(snapshots?.snapshots ?? []).map((s) => html`<span class="label">${s.name}</span>`)}</dd>
    </dl>
    <p><a href="/metrics" target="_blank">Prometheus metrics</a></p>
  </section>`;
}

function App(): Child {
  const route = useRoute();
  const [errors, setErrors] = useState<string[]>([]);
  showError = (msg) => setErrors((e) => [...e.slice(-3), msg]);
  const page = useMemo(() => {
    const m = /^\/i\/(.+)$/.exec(route);
    if (m) return html`<${InstancePage} id=${decodeURIComponent(m[1] ?? '')} />`;
    if (route === '/images') return html`<${ImagesPage} />`;
    if (route === '/daemon') return html`<${DaemonPage} />`;
    return html`<${InstancesPage} />`;
  }, [route]);
  const nav = (href: string, label: string, on: boolean): Child => html`<a href=${href} class=${on ? 'on' : ''}>${label}</a>`;
  return html`<header>
      <strong>Aegis</strong>
      ${nav('#/', 'Instances', route === '/' || route.startsWith('/i/'))} ${nav('#/images', 'Images', route === '/images')}
      ${nav('#/daemon', 'Daemon', route === '/daemon')}
    </header>
    ${errors.map((e, n) => html`<div class="error" onClick=${() => setErrors((l) => l.filter((_, k) => k !== n))}>${e}</div>`)}
    <main>${page}</main>`;
}

const root = document.getElementById('app');
if (root) render(html`<${App} />`, root);
