#!/usr/bin/env bash
# Builds the Aegis guest kernel from Debian's linux-source package and prints the path of the
# uncompressed vmlinux (QEMU boots it through its PVH note; Firecracker needs it too).
# Output is cached by a key over the config fragment, this script and the source version, so a
# second run is instant.  Usage: guest/kernel/build.sh [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${1:-${AEGIS_HOME:-$HOME/.aegis}/cache}
# The newest kernel source Debian installed (linux-source-6.1 on Debian 12).
src_tar=$(ls /usr/src/linux-source-*.tar.xz /usr/src/linux-source-*.tar.bz2 2>/dev/null | sort -V | tail -n 1 || true)
[ -n "$src_tar" ] || { echo "no kernel source in /usr/src (apt-get install linux-source)" >&2; exit 1; }
src_pkg=$(basename "$src_tar"); src_pkg=${src_pkg%.tar.*}
src_ver=$(dpkg-query -W -f='${Version}' "$src_pkg")
arch=$(uname -m)
[ "$arch" = x86_64 ] || { echo "guest kernel config is written for x86_64; $arch is not done yet" >&2; exit 1; }
# Keyed by the config alone: editing this script must not force a 10-minute rebuild.
key=$(sha256sum < "$here/aegis.config" | cut -c1-16)-$src_ver-$arch
out="$cache/kernel/$key"
link() { ln -sfn "$key/vmlinux" "$cache/kernel/vmlinux"; echo "$out/vmlinux"; }
if [ -f "$out/vmlinux" ]; then link; exit 0; fi

work="$cache/kernel/build-$key"
rm -rf "$work"; mkdir -p "$work"
echo "building guest kernel $src_ver ($arch) in $work; this takes ~10 min once" >&2
tar -C "$work" -xf "$src_tar"
cd "$work/$src_pkg"
make -s tinyconfig >&2
opts=()
while read -r opt; do
  case "$opt" in ''|'#'*) continue ;; esac
  case "$opt" in -*) opts+=(--disable "${opt#-}") ;; *) opts+=(--enable "$opt") ;; esac
done < "$here/aegis.config"
scripts/config "${opts[@]}" --disable MODULES
make -s olddefconfig >&2
# olddefconfig silently drops options whose prerequisites are off: check every one survived.
missing=()
while read -r opt; do
  case "$opt" in ''|'#'*) continue ;; -*) grep -q "^CONFIG_${opt#-}=y" .config && missing+=("$opt"); continue ;; esac
  grep -q "^CONFIG_$opt=y" .config || missing+=("$opt")
done < "$here/aegis.config"
if [ ${#missing[@]} -gt 0 ]; then echo "kernel config lost: ${missing[*]}" >&2; exit 1; fi
export CCACHE_DIR="$cache/ccache"
cc="gcc"; command -v ccache >/dev/null && cc="ccache gcc"
make -s -j"$(nproc)" CC="$cc" vmlinux >&2
mkdir -p "$out.tmp"
strip --strip-debug -o "$out.tmp/vmlinux" vmlinux
cp .config "$out.tmp/config"
rm -rf "$out"; mv "$out.tmp" "$out"
cd /; rm -rf "$work"
link
