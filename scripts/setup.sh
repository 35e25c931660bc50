#!/usr/bin/env bash
# Installs the system packages Aegis needs to build and run, when missing.
# Debian/Ubuntu: apt-get (with sudo when not root). Elsewhere: says what to install.
set -euo pipefail

case "$(uname -m)" in
  x86_64) qemu=qemu-system-x86 ;;
  aarch64) qemu=qemu-system-arm ;;
  *) echo "Aegis supports x86_64 and arm64 hosts, not $(uname -m)" >&2; exit 1 ;;
esac
# qemu: the VMM (qemu-utils: qemu-img for copy-on-write instance disks); erofs-utils/e2fsprogs: guest disks without mounting; linux-source and the
# toolchain: our guest kernel; gcc/libc6-dev: the static guest init; python3/make/g++: node-gyp; passt: guest networking;
# iproute2/util-linux: the network tests' private namespace.
pkgs=("$qemu" qemu-utils erofs-utils e2fsprogs linux-source bc bison flex libelf-dev libssl-dev gcc g++ make
      libc6-dev ccache xz-utils python3 dpkg-dev ca-certificates passt iproute2 util-linux
      tmux # tmux: the tests drive `aegis exec -it` under a real terminal
      chromium # the dashboard's browser tests (tests/integration/ui.test.ts, through playwright-core)
      docker-registry skopeo umoci) # image tests: a real registry and client; the bench's reference unpacker

if ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
  echo "This system has no apt-get. Install the equivalents of: ${pkgs[*]} and Node.js >= 20, then run make again." >&2
  exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  echo "installing: ${missing[*]}" >&2
  "${sudo[@]}" apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

if ! command -v node >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "Aegis needs Node.js >= 20 on the host (found: $(node --version 2>/dev/null || echo none))." >&2
  exit 1
fi
