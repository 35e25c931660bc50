#!/usr/bin/env bash
# E2B's own SDK tests against aegisd: runs packages/js-sdk/tests/sandbox of an E2B checkout, at
# the tag of the `e2b` version we pin (package.json), against a throwaway aegisd serving the
# E2B endpoint with real VMs, and prints passed / failed / skipped, each skip with its reason.
#
#   scripts/e2b-conformance.sh PATH-TO-E2B-CHECKOUT [TAG]     (TAG default: e2b@<pinned version>)
#
# Not part of CI: the checkout is not ours to ship. Nothing is installed: the checkout's SDK
# source runs on the packages this repository already has for the pinned `e2b` (a node_modules
# of symlinks in a temporary git worktree of the checkout, which is removed afterwards; the
# checkout itself is not touched). Files that mock E2B's cloud with msw (they test the SDK,
# not a server) and files for features of E2B's cloud are skipped, with the reason printed.
# Extra vitest arguments: E2B_CONFORMANCE_ARGS (e.g. a file filter).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKOUT="${1:?usage: scripts/e2b-conformance.sh PATH-TO-E2B-CHECKOUT [TAG]}"
CHECKOUT="$(cd "$CHECKOUT" && pwd)"
PINNED="$(node -p "require('$ROOT/package.json').devDependencies.e2b.replace(/^[~^]/, '')")"
TAG="${2:-e2b@$PINNED}"

if ! git -C "$CHECKOUT" rev-parse -q --verify "refs/tags/$TAG" >/dev/null; then
  echo "e2b-conformance: the checkout has no tag $TAG (git -C $CHECKOUT fetch --tags; or name another tag)" >&2
  exit 2
fi
for f in "$ROOT/packages/daemon/dist/main.js" "$ROOT/bin/aegis"; do
  [[ -e "$f" ]] || { echo "e2b-conformance: $f is missing: run make aegisd aegis" >&2; exit 2; }
done

WORK="$(mktemp -d /tmp/e2b-conformance-XXXXXX)"
TREE="$WORK/e2b"
HOME_DIR="$WORK/aegis-home"
DAEMON_PID=""
cleanup() {
  if [[ -n "$DAEMON_PID" ]]; then
    AEGIS_HOME="$HOME_DIR" "$ROOT/bin/aegis" ps -aq 2>/dev/null | while read -r id; do
      AEGIS_HOME="$HOME_DIR" "$ROOT/bin/aegis" rm -f "$id" >/dev/null 2>&1 || true
    done
    kill "$DAEMON_PID" 2>/dev/null || true
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  git -C "$CHECKOUT" worktree remove --force "$TREE" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

git -C "$CHECKOUT" worktree add --detach -q "$TREE" "$TAG"
SDK="$TREE/packages/js-sdk"

# node_modules of symlinks: the pinned e2b's own dependencies first, then this repository's.
mkdir -p "$SDK/node_modules"
link_all() {
  local from="$1"
  [[ -d "$from" ]] || return 0
  for entry in "$from"/* "$from"/.bin; do
    [[ -e "$entry" ]] || continue
    local name
    name="$(basename "$entry")"
    if [[ "$name" == @* ]]; then
      mkdir -p "$SDK/node_modules/$name"
      for sub in "$entry"/*; do
        [[ -e "$SDK/node_modules/$name/$(basename "$sub")" ]] || ln -s "$sub" "$SDK/node_modules/$name/$(basename "$sub")"
      done
    elif [[ ! -e "$SDK/node_modules/$name" ]]; then
      ln -s "$entry" "$SDK/node_modules/$name"
    fi
  done
}
link_all "$ROOT/node_modules/e2b/node_modules"
link_all "$ROOT/node_modules"

# What is skipped, and why.
declare -A SKIP=(
  [tests/sandbox/egressProxy.test.ts]="E2B's egress proxy is part of its cloud"
  [tests/sandbox/iam.test.ts]="E2B's workload identity (IAM) is part of its cloud"
  [tests/sandbox/volume]="E2B volumes are part of its cloud (aegis has named volumes)"
  [tests/sandbox/git]="git against GitHub: needs the internet from the VM, not a property of the endpoint"
)
for f in $(cd "$SDK" && grep -rl "from 'msw" tests/sandbox || true); do
  SKIP[$f]="mocks E2B's API with msw: tests the SDK, not a server"
done
EXCLUDES=""
for k in "${!SKIP[@]}"; do EXCLUDES+="'$k/**','$k',"; done

SETUP=""
[[ -f "$SDK/tests/globalFetchFallback.setup.ts" ]] && SETUP="'tests/globalFetchFallback.setup.ts'"
# The SDK bundles error-stack-parser-es (template builds' stack traces) into its dist: a stand-in
# that finds no frames, so the source can load without it.
echo 'export function parse() { return [] }' >"$WORK/error-stack-parser-es.mjs"
cat >"$SDK/vitest.aegis.config.mts" <<EOF
import { defineConfig } from 'vitest/config'
export default defineConfig({
  resolve: { alias: { 'error-stack-parser-es': '$WORK/error-stack-parser-es.mjs' } },
  test: {
    include: ['tests/sandbox/**/*.test.ts'],
    exclude: [${EXCLUDES}],
    fileParallelism: false,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    environment: 'node',
    setupFiles: [${SETUP}],
  },
})
EOF

# A throwaway aegisd with the E2B endpoint.
mkdir -p "$HOME_DIR"
CACHE="${AEGIS_HOME:-$HOME/.aegis}/cache"
AEGIS_HOME="$HOME_DIR" AEGIS_KERNEL="$(readlink -f "$CACHE/kernel/vmlinux")" AEGIS_ROOTFS="$(readlink -f "$CACHE/rootfs/base.erofs")" \
  AEGIS_POOL_SIZE="${AEGIS_POOL_SIZE:-0}" AEGIS_E2B_ADDR=127.0.0.1:0 node "$ROOT/packages/daemon/dist/main.js" >"$WORK/aegisd.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 1 200); do [[ -s "$HOME_DIR/e2b.addr" ]] && break; sleep 0.1; done
[[ -s "$HOME_DIR/e2b.addr" ]] || { echo "e2b-conformance: aegisd did not start:" >&2; cat "$WORK/aegisd.log" >&2; exit 1; }
eval "$(AEGIS_HOME="$HOME_DIR" "$ROOT/bin/aegis" e2b env)"
export E2B_API_URL E2B_SANDBOX_URL E2B_API_KEY

echo "e2b-conformance: $TAG's tests/sandbox against aegisd at $E2B_API_URL (SDK source of the tag; pinned e2b $PINNED)"
set +e
(cd "$SDK" && "$ROOT/node_modules/.bin/vitest" run --config vitest.aegis.config.mts --reporter=json --outputFile="$WORK/result.json" \
  --reporter=dot ${E2B_CONFORMANCE_ARGS:-}) >"$WORK/vitest.log" 2>&1
set -e

node - "$WORK/result.json" "$WORK/skips.json" <<'EOF' 3<<<"$(for k in "${!SKIP[@]}"; do printf '%s\t%s\n' "$k" "${SKIP[$k]}"; done)"
const fs = require('node:fs');
const [resultFile] = process.argv.slice(2);
const skips = fs.readFileSync(3, 'utf8').split('\n').filter(Boolean).map((l) => l.split('\t'));
let r;
try {
  r = JSON.parse(fs.readFileSync(resultFile, 'utf8'));
} catch {
  console.log('e2b-conformance: vitest wrote no result (its log below)');
  process.exit(0);
}
const counts = { passed: 0, failed: 0, skipped: 0 };
const failed = [];
const skipped = [];
for (const file of r.testResults) {
  const rel = file.name.replace(/^.*packages\/js-sdk\//, '');
  if (file.assertionResults.length === 0 && file.status === 'failed') {
    counts.failed++;
    failed.push(`${rel}: ${(file.message || '').split('\n')[0]}`);
  }
  for (const t of file.assertionResults) {
    if (t.status === 'passed') counts.passed++;
    else if (t.status === 'failed') {
      counts.failed++;
      failed.push(`${rel} > ${t.fullName}: ${(t.failureMessages[0] || '').split('\n')[0].slice(0, 200)}`);
    } else {
      counts.skipped++;
      skipped.push(`${rel} > ${t.fullName}: skipped by the suite itself (test.skip / skipIf)`);
    }
  }
}
for (const [path, why] of skips) skipped.push(`${path} (whole file): ${why}`);
console.log(`passed ${counts.passed}  failed ${counts.failed}  skipped ${counts.skipped} tests + ${skips.length} files`);
for (const s of skipped) console.log(`  skip  ${s}`);
for (const f of failed) console.log(`  FAIL  ${f}`);
EOF
echo "--- vitest log (last lines) ---"; tail -"${E2B_CONFORMANCE_LOG_LINES:-15}" "$WORK/vitest.log"
