/**
 * aegisd's API as the page reaches it: the dashboard port's pass-through (`/api/v1/…`, the same
 * operations as the unix socket's). The token travels as an HttpOnly cookie the page cannot read.
 */
export class ApiError extends Error {
  constructor(
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

async function failure(res: Response): Promise<ApiError> {
  const body = (await res.json().catch(() => ({}))) as { code?: string; message?: string };
  return new ApiError(body.code ?? 'UNKNOWN', body.message ?? `HTTP ${res.status}`);
}

/** A JSON operation; undefined for an answer without a body (204). */
export async function call<T>(method: string, path: string, body?: unknown): Promise<T> {
  const res = await fetch(`/api${path}`, {
    method,
    ...(body !== undefined ? { body: JSON.stringify(body), headers: { 'content-type': 'application/json' } } : {}),
  });
  if (!res.ok) throw await failure(res);
  if (res.status === 204) return undefined as T;
  return (await res.json()) as T;
}

/** An NDJSON stream (events, logs), one parsed object per line, until it ends or `signal` aborts. */
export async function* stream<T>(path: string, signal: AbortSignal): AsyncGenerator<T> {
  const res = await fetch(`/api${path}`, { signal });
  if (!res.ok || !res.body) throw await failure(res);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    let nl: number;
    while ((nl = buffered.indexOf('\n')) !== -1) {
      const line = buffered.slice(0, nl);
      buffered = buffered.slice(nl + 1);
      if (line.trim() !== '') yield JSON.parse(line) as T;
    }
  }
}

/** Base64 (the API's encoding of output bytes) to text. */
export function decodeBase64(data: string, decoder: TextDecoder): string {
  const bin = atob(data);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return decoder.decode(bytes, { stream: true });
}

export const ref = (id: string): string => encodeURIComponent(id);
