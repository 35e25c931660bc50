/** A Prometheus text exposition parsed by a third-party parser (not ours), for tests. */
import http from 'node:http';
// @ts-expect-error: the parser ships no types; its output is prom2json's shape, typed below.
import parsePrometheusTextFormat from 'parse-prometheus-text-format';

export interface Family {
  name: string;
  type: string;
  metrics: { value?: string; labels?: Record<string, string>; count?: string; sum?: string; buckets?: Record<string, string> }[];
}

export function parseMetrics(text: string): Map<string, Family> {
  const families = (parsePrometheusTextFormat as (t: string) => Family[])(text);
  return new Map(families.map((f) => [f.name, f]));
}

/** GET `urlPath` on a unix socket: status, content type and body. */
export function getOnSocket(socketPath: string, urlPath: string): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ socketPath, path: urlPath }, (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () =>
          resolve({
            status: res.statusCode ?? 0,
            type: String(res.headers['content-type'] ?? ''),
            body: Buffer.concat(chunks).toString('utf8'),
          }),
        );
      })
      .on('error', reject);
  });
}

/** The value of the series of `family` whose labels include `labels`, as a number; undefined when none. */
export function valueOf(m: Map<string, Family>, family: string, labels: Record<string, string> = {}): number | undefined {
  const series = m.get(family)?.metrics.find((s) => Object.entries(labels).every(([k, v]) => s.labels?.[k] === v));
  const raw = series?.value ?? series?.count;
  return raw === undefined ? undefined : Number(raw);
}
