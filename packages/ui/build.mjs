// The dashboard as the three files aegisd serves (dist/index.html, app.js, app.css): everything,
// xterm.js and uPlot included, bundled here at build time, so the page loads nothing from
// elsewhere and works offline (the server's Content-Security-Policy allows only itself).
// `tsc -b` checks the types; esbuild only strips them.
import { copyFile, mkdir } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));
const out = path.join(here, 'dist');
await mkdir(out, { recursive: true });
await build({
  entryPoints: { app: path.join(here, 'src/main.ts') },
  outdir: out,
  bundle: true,
  platform: 'browser',
  format: 'esm',
  target: 'es2022',
  minify: true,
  sourcemap: 'linked',
  logLevel: 'warning',
});
await copyFile(path.join(here, 'src/index.html'), path.join(out, 'index.html'));
