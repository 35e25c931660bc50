/**
 * `trust`: the egress broker's per-instance CA made trusted in the guest before the workload
 * runs, in our root and in the image's (a workload in an image sees only that root). Programs
 * find it three ways: the system bundle of each root (Debian's, RHEL's, Alpine's: whichever
 * exist, appended to), /etc/aegis/ca-bundle.pem (that bundle plus the CA: what the host points
 * SSL_CERT_FILE, REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE at) and /etc/aegis/egress-ca.pem (the CA
 * alone: NODE_EXTRA_CA_CERTS). Idempotent: a restored or restarted guest may be told twice.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { IMAGE_ROOT } from './image.js';

const SYSTEM_BUNDLES = ['etc/ssl/certs/ca-certificates.crt', 'etc/pki/tls/certs/ca-bundle.crt', 'etc/ssl/cert.pem'];

async function exists(p: string): Promise<boolean> {
  return fs.stat(p).then(
    () => true,
    () => false,
  );
}

export async function trustCa(caPem: string): Promise<void> {
  const pem = caPem.endsWith('\n') ? caPem : `${caPem}\n`;
  const roots = ['/', ...((await exists(path.join(IMAGE_ROOT, 'etc'))) ? [IMAGE_ROOT] : [])];
  for (const root of roots) {
    let system = '';
    for (const rel of SYSTEM_BUNDLES) {
      const file = path.join(root, rel);
      // Through the root's own symlinks (Alpine's cert.pem) only while they stay inside it.
      const real = await fs.realpath(file).catch(() => undefined);
      if (!real || (root !== '/' && !real.startsWith(`${root}/`))) continue;
      const text = await fs.readFile(real, 'utf8');
      if (!system) system = text;
      if (!text.includes(pem.trim())) await fs.appendFile(real, (text.endsWith('\n') || text === '' ? '' : '\n') + pem);
    }
    const dir = path.join(root, 'etc/aegis');
    await fs.mkdir(dir, { recursive: true, mode: 0o755 });
    await fs.writeFile(path.join(dir, 'egress-ca.pem'), pem, { mode: 0o644 });
    const bundle = system.includes(pem.trim()) ? system : system + (system.endsWith('\n') || system === '' ? '' : '\n') + pem;
    await fs.writeFile(path.join(dir, 'ca-bundle.pem'), bundle, { mode: 0o644 });
  }
}
