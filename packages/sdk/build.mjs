// The SDK ships as one file: @aegis/client and @aegis/protocol (private workspace packages)
// are bundled in, so `npm pack` gives a tarball that installs anywhere. Types come from tsc
// (`tsc -b`), and name only the SDK's own types.
import { build } from 'esbuild';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

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
