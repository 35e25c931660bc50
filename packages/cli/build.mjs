// The aegis CLI as one ES module, dist/aegis.mjs (bin/aegis runs it), for its start time.
// Unbundled, Node 20 finds, reads and compiles ~80 modules on every start: `aegis --version`
// took 55 ms more than `node -e 0` here; bundled, 20 ms (npm run bench with BENCH_ONLY=cli).
// Node 20 has no compile cache to lean on instead (module.enableCompileCache and
// NODE_COMPILE_CACHE arrive in Node 22.1). Our own sources come from src/; the other packages
// from their dist/ (tsc -b first), with their source maps followed back to their .ts files.
// The root's `npm run build` runs tsc -b, then this.
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { build } from 'esbuild';

const here = path.dirname(fileURLToPath(import.meta.url));
const nodeRequire = createRequire(import.meta.url);
const outfile = path.join(here, 'dist/aegis.mjs');

/**
 * `import.meta.url` keeps its meaning under tsc: the URL of the module's own compiled file
 * (src/x/y.ts -> dist/x/y.js), so paths relative to it (the daemon's entry point, in
 * commands/system/daemon.ts) stay right from inside the bundle.
 */
const ownModuleUrl = {
  name: 'own-module-url',
  setup(b) {
    b.onLoad({ filter: /\/packages\/cli\/src\/.*\.ts$/ }, async (args) => {
      const source = await readFile(args.path, 'utf8');
      if (!source.includes('import.meta.url')) return undefined;
      const compiled = path.join(here, 'dist', path.relative(path.join(here, 'src'), args.path)).replace(/\.ts$/, '.js');
      const url = `new URL(${JSON.stringify(`./${path.relative(path.dirname(outfile), compiled)}`)}, import.meta.url).href`;
      return { contents: source.replaceAll('import.meta.url', url), loader: 'ts' };
    });
  },
};

/**
 * Node's modules that `aegis --version` never touches, each a millisecond or more to load (2-3 ms
 * together). Their export names are read here, from the Node running the build.
 */
const LAZY = ['node:child_process', 'node:http', 'node:net', 'node:crypto'];

/**
 * Node's own modules through require(), not import: an ES import of node:fs builds a facade of
 * all its exports, which loads fs's streams and more on every start (4 ms here). Those in
 * LAZY load on the first use of one of their exports (commander's child_process, for one).
 */
const builtinsByRequire = {
  name: 'builtins-by-require',
  setup(b) {
    b.onResolve({ filter: /^node:/ }, (args) =>
      args.namespace === 'builtin' ? { path: args.path, external: true } : { path: args.path, namespace: 'builtin' },
    );
    b.onLoad({ filter: /.*/, namespace: 'builtin' }, (args) => {
      const name = JSON.stringify(args.path);
      if (!LAZY.includes(args.path)) return { contents: `module.exports = require(${name});` };
      const getters = Object.keys(nodeRequire(args.path)).map(
        (k) => `  ${JSON.stringify(k)}: { get: () => load()[${JSON.stringify(k)}], enumerable: true },`,
      );
      return {
        contents: `let m;\nconst load = () => (m ??= require(${name}));\nmodule.exports = Object.defineProperties({}, {\n${getters.join('\n')}\n});`,
      };
    });
  },
};

await build({
  entryPoints: [path.join(here, 'src/main.ts')],
  outfile,
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  // The require() that commander, cli-progress and the plugin above use.
  banner: {
    js: "import { createRequire as __aegisCreateRequire } from 'node:module';\nconst require = __aegisCreateRequire(import.meta.url);",
  },
  // Not loaded unless asked for: NODE_OPTIONS=--enable-source-maps (it costs 30 ms a start).
  sourcemap: 'linked',
  plugins: [ownModuleUrl, builtinsByRequire],
  // Only `aegis mcp` needs these (hundreds of KiB): loaded from node_modules when it runs, so
  // every other command's start does not parse them.
  external: ['@modelcontextprotocol/sdk', '@modelcontextprotocol/sdk/*', 'zod', 'zod/*'],
  logLevel: 'warning',
});
