// The SDK ships as one file: @aegis/client and @aegis/protocol (private workspace packages)
// are bundled in, so `npm pack` gives a tarball that installs anywhere. Types come from tsc
// (`tsc -b`), and name only the SDK's own types.
import { build } from 'esbuild';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ERROR_CODES } from '@aegis/protocol';

const here = path.dirname(fileURLToPath(import.meta.url));
await build({
  entryPoints: [path.join(here, 'src/index.ts')],
  outfile: path.join(here, 'dist/sdk.mjs'),
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  sourcemap: true,
  logLevel: 'warning',
});

// The declarations cannot import @aegis/protocol either (the tarball does not have it). The
// one type they take from it, the error-code union, is written out from the registry itself,
// so the SDK never lists the codes by hand; any other import of ours fails the build.
const dist = path.join(here, 'dist');
const codes = Object.keys(ERROR_CODES)
  .map((c) => `'${c}'`)
  .join(' | ');
for (const name of readdirSync(dist).filter((f) => f.endsWith('.d.ts'))) {
  const file = path.join(dist, name);
  const before = readFileSync(file, 'utf8');
  const after = before.replace(/^import \{ type ErrorCode \} from '@aegis\/protocol';$/m, `type ErrorCode = ${codes};`);
  if (/from '@aegis\//.test(after)) throw new Error(`${name}: the SDK's declarations import a package the tarball does not ship`);
  if (after !== before) writeFileSync(file, after);
}
