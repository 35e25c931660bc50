/**
 * The name a connection's first bytes ask for: the SNI of a TLS ClientHello, or the Host of an
 * HTTP/1 request. Read from untrusted bytes, so every length is checked against what is there.
 */

export type ServerName =
  { kind: 'more' } | { kind: 'tls'; name: string | undefined } | { kind: 'http'; name: string | undefined } | { kind: 'other' };

const HTTP_METHOD = /^(GET|HEAD|POST|PUT|DELETE|OPTIONS|PATCH|TRACE|CONNECT|PROPFIND|MKCOL|COPY|MOVE|LOCK|UNLOCK|REPORT) /;

export function serverName(head: Buffer): ServerName {
  if (head.length === 0) return { kind: 'more' };
  if (head[0] === 0x16) return tlsServerName(head);
  const text = head.subarray(0, Math.min(head.length, 16 * 1024)).toString('latin1');
  const method = HTTP_METHOD.exec(text);
  if (!method) return /^[A-Z]{1,16}$/.test(text) ? { kind: 'more' } : { kind: 'other' };
  const end = text.indexOf('\r\n\r\n');
  if (end < 0) return { kind: 'more' };
  const lines = text.slice(0, end).split('\r\n');
  const requestLine = lines[0] ?? '';
  let host: string | undefined;
  for (const line of lines.slice(1)) {
    const m = /^host:\s*(.*?)\s*$/i.exec(line);
    if (m) {
      host = m[1];
      break;
    }
  }
  // An absolute-form target (a proxy-style request) names its host too; CONNECT names only that.
  const target = requestLine.split(' ')[1] ?? '';
  if (method[1] === 'CONNECT') host = target;
  else if (!host) host = /^https?:\/\/([^/?#]+)/i.exec(target)?.[1];
  return { kind: 'http', name: host === undefined ? undefined : stripPort(host) };
}

function stripPort(host: string): string {
  const h = host.toLowerCase();
  if (h.startsWith('[')) return h.slice(1, h.indexOf(']') > 0 ? h.indexOf(']') : undefined);
  const i = h.lastIndexOf(':');
  return i > 0 && h.indexOf(':') === i ? h.slice(0, i) : h;
}

/** TLS record(s) carrying a ClientHello: its server_name extension's host_name. */
function tlsServerName(head: Buffer): ServerName {
  // Handshake bytes may span records: join the payloads of the leading handshake records.
  const parts: Buffer[] = [];
  let off = 0;
  while (off + 5 <= head.length && head[off] === 0x16) {
    const len = head.readUInt16BE(off + 3);
    parts.push(head.subarray(off + 5, Math.min(off + 5 + len, head.length)));
    if (off + 5 + len > head.length) break;
    off += 5 + len;
  }
  const hs = Buffer.concat(parts);
  if (hs.length < 4) return { kind: 'more' };
  if (hs[0] !== 0x01) return { kind: 'tls', name: undefined }; // not a ClientHello
  const bodyLen = hs.readUIntBE(1, 3);
  if (hs.length < 4 + bodyLen) return head.length > 16 * 1024 ? { kind: 'tls', name: undefined } : { kind: 'more' };
  const b = hs.subarray(4, 4 + bodyLen);
  let p = 2 + 32; // version, random
  const need = (n: number): boolean => p + n <= b.length;
  if (!need(1)) return { kind: 'tls', name: undefined };
  p += 1 + (b[p] as number); // session id
  if (!need(2)) return { kind: 'tls', name: undefined };
  p += 2 + b.readUInt16BE(p); // cipher suites
  if (!need(1)) return { kind: 'tls', name: undefined };
  p += 1 + (b[p] as number); // compression methods
  if (!need(2)) return { kind: 'tls', name: undefined };
  const extEnd = Math.min(b.length, p + 2 + b.readUInt16BE(p));
  p += 2;
  while (p + 4 <= extEnd) {
    const type = b.readUInt16BE(p);
    const len = b.readUInt16BE(p + 2);
    const data = b.subarray(p + 4, Math.min(p + 4 + len, extEnd));
    p += 4 + len;
    if (type !== 0) continue;
    // server_name: list length, then entries of (type u8, length u16, name).
    let q = 2;
    while (q + 3 <= data.length) {
      const nameType = data[q] as number;
      const nameLen = data.readUInt16BE(q + 1);
      const name = data.subarray(q + 3, q + 3 + nameLen);
      q += 3 + nameLen;
      if (nameType === 0 && name.length === nameLen) return { kind: 'tls', name: name.toString('latin1').toLowerCase() };
    }
  }
  return { kind: 'tls', name: undefined };
}
