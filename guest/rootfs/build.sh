#!/usr/bin/env bash
# Builds the Aegis base rootfs, a read-only erofs image, from Debian packages plus our guest
# PID 1 (aegis-init, C), the harness bundle and the Node runtime it runs on (node.lock, from
# the npm registry). Never needs a mount or root: packages are unpacked with `dpkg -x` and
# the image is written by mkfs.erofs.
# Prints the image path. Cached: the unpacked tree by the package list, the image by its inputs.
# Usage: guest/rootfs/build.sh HARNESS_BUNDLE INIT_SOURCE [CACHE_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bundle=$1
init_src=$2
cache=${3:-${AEGIS_HOME:-$HOME/.aegis}/cache}/rootfs
arch=$(dpkg --print-architecture)
mkdir -p "$cache"

pkgs=$(grep -v '^#' "$here/packages.txt" | xargs)
tree_key=$( (echo "$arch"; cat "$here/packages.txt" "$here/node.lock" "$here/build.sh") | sha256sum | cut -c1-16)
tree="$cache/tree-$tree_key"

if [ ! -d "$tree" ]; then
  echo "unpacking Debian packages for the base rootfs ($arch)..." >&2
  work="$cache/work-$tree_key"
  rm -rf "$work"; mkdir -p "$work/debs/partial" "$work/tree"
  : > "$work/status"
  # An empty dpkg status makes apt resolve the full closure as for a new system, and pick
  # each package from the Debian archive rather than whatever the host has installed.
  apt-get -q -o Dir::State::status="$work/status" -o Dir::Cache::archives="$work/debs" \
    -o Debug::NoLocking=1 -o APT::Install-Recommends=false \
    --download-only -y install $pkgs >&2
  for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/tree"; done
  t="$work/tree"
  # What maintainer scripts would have done.
  [ -e "$t/bin/sh" ] || ln -s dash "$t/bin/sh"
  # update-alternatives' links (dpkg-deb -x runs no postinst): without them `awk`, `which`
  # and `pager` answer 127.
  for alt in awk:mawk nawk:mawk which:which.debianutils pager:less; do
    name=${alt%%:*} target=${alt#*:}
    if [ -e "$t/usr/bin/$target" ] && [ ! -e "$t/usr/bin/$name" ]; then ln -s "$target" "$t/usr/bin/$name"; fi
  done
  cp "$t/usr/share/base-passwd/passwd.master" "$t/etc/passwd"
  cp "$t/usr/share/base-passwd/group.master" "$t/etc/group"
  echo "aegis" > "$t/etc/hostname"
  printf '127.0.0.1 localhost aegis\n::1 localhost\n' > "$t/etc/hosts"
  mkdir -p "$t"/{proc,sys,dev,tmp,run,root,home,mnt,opt,srv,var/tmp,aegis/scratch,aegis/newroot} \
    "$t"/usr/local/{bin,sbin,lib,share,src,include}
  # The harness's runtime: official Node build from the npm registry, integrity-checked.
  node_ver=$(sed -n 's/^version=//p' "$here/node.lock")
  case "$arch" in amd64) narch=x64 ;; arm64) narch=arm64 ;; *) echo "no Node runtime pinned for $arch" >&2; exit 1 ;; esac
  want=$(sed -n "s/^$narch=//p" "$here/node.lock")
  (cd "$work" && npm pack --silent "node-linux-$narch@$node_ver" >/dev/null)
  tgz="$work/node-linux-$narch-$node_ver.tgz"
  got=$(node -e 'const c=require("crypto");process.stdout.write("sha512-"+c.createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tgz")
  [ "$got" = "$want" ] || { echo "node-linux-$narch@$node_ver integrity mismatch: $got" >&2; exit 1; }
  mkdir -p "$t/aegis"
  tar -xzf "$tgz" -C "$work" package/bin/node
  install -m 0755 "$work/package/bin/node" "$t/aegis/node"
  # Node is the agent's runtime, not the workload's: it is not on PATH (/aegis/node only).
  ldconfig -r "$t" 2>/dev/null || true
  chmod 1777 "$t/tmp" "$t/var/tmp"; chmod 700 "$t/root"
  rm -rf "$t/usr/share/doc" "$t/usr/share/man" "$t/usr/share/info" "$t/usr/share/locale"
  mv "$work/tree" "$tree"
  rm -rf "$work"
  find "$cache" -maxdepth 1 -name 'tree-*' ! -name "tree-$tree_key" -exec rm -rf {} +
fi

# aegis-init is every C file beside INIT_SOURCE (init.c and the data plane).
native_dir=$(dirname "$init_src")
init_bin="$cache/aegis-init-$(cat "$native_dir"/*.c "$native_dir"/*.h | sha256sum | cut -c1-16)"
if [ ! -x "$init_bin" ]; then
  gcc -static -O2 -Wall -pthread -o "$init_bin.tmp" "$native_dir"/*.c
  mv "$init_bin.tmp" "$init_bin"
  find "$cache" -maxdepth 1 -name "aegis-init-*" ! -name "$(basename "$init_bin")" -delete
fi

image_key=$( (echo "$tree_key"; sha256sum "$init_bin" "$bundle" | cut -d' ' -f1) | sha256sum | cut -c1-16)
image="$cache/base-$image_key.erofs"
if [ ! -f "$image" ]; then
  install -m 0755 "$init_bin" "$tree/aegis/init"
  install -m 0644 "$bundle" "$tree/aegis/harness.mjs"
  owner=(); [ "$(id -u)" = 0 ] || owner=(--all-root)
  mkfs.erofs --quiet "${owner[@]}" -T0 "$image.tmp" "$tree" >&2
  mv "$image.tmp" "$image"
  # Keep the newest few images: running VMs may still use an older one.
  ls -t "$cache"/base-*.erofs | tail -n +4 | xargs -r rm -f
fi
ln -sfn "$(basename "$image")" "$cache/base.erofs"
echo "$image"
