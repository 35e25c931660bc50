/**
 * The instance list's CPU and memory sparklines: one `/metrics` scrape (every instance's
 * figures in one request, prom-client's text format) every SAMPLE_MS while the list is shown
 * and the tab visible — not one `/stats` call per row, so fifty rows cost what one does.
 */
import { useEffect, useState } from 'preact/hooks';
import { parseMetrics } from './metrics-text.js';

export const SAMPLE_MS = 5000;
/** Points kept per instance: the last two and a half minutes. */
const POINTS = 30;

export interface Samples {
  /** Percent of one CPU over each interval. */
  cpuPercent: number[];
  /** The VMM's proportional set size on the host, MiB. */
  memoryMiB: number[];
}

export function useSamples(): Map<string, Samples> {
  const [samples, setSamples] = useState<Map<string, Samples>>(new Map());
  useEffect(() => {
    let last: { atMs: number; cpuSeconds: Map<string, number> } | undefined;
    let stopped = false;
    const tick = async (): Promise<void> => {
      if (document.visibilityState !== 'visible') return;
      const res = await fetch('/metrics').catch(() => undefined);
      if (!res?.ok || stopped) return;
      const atMs = Date.now();
      const cpuSeconds = new Map<string, number>();
      const pss = new Map<string, number>();
      for (const s of parseMetrics(await res.text())) {
        const id = s.labels['instance'];
        if (id === undefined) continue;
        if (s.name === 'aegis_instance_cpu_seconds_total') cpuSeconds.set(id, s.value);
        if (s.name === 'aegis_instance_memory_bytes' && s.labels['kind'] === 'host_pss') pss.set(id, s.value / 1048576);
      }
      const prev = last;
      last = { atMs, cpuSeconds };
      setSamples((old) => {
        const next = new Map<string, Samples>();
        for (const [id, seconds] of cpuSeconds) {
          const was = old.get(id) ?? { cpuPercent: [], memoryMiB: [] };
          const before = prev?.cpuSeconds.get(id);
          const cpu = prev && before !== undefined ? (Math.max(0, seconds - before) / ((atMs - prev.atMs) / 1000)) * 100 : undefined;
          next.set(id, {
            cpuPercent: cpu === undefined ? was.cpuPercent : [...was.cpuPercent, cpu].slice(-POINTS),
            memoryMiB: [...was.memoryMiB, pss.get(id) ?? 0].slice(-POINTS),
          });
        }
        return next;
      });
    };
    void tick();
    const timer = setInterval(() => void tick(), SAMPLE_MS);
    return () => {
      stopped = true;
      clearInterval(timer);
    };
  }, []);
  return samples;
}
