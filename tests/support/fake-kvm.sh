#!/bin/sh
# Runs "$@" in a private mount namespace (root only) with a /dev of its own, where
#   AEGIS_FAKE_KVM=null     /dev/kvm is /dev/null: a device that opens read-write but is not KVM
#   AEGIS_FAKE_KVM=absent   there is no /dev/kvm at all
# Nothing outside the namespace changes: the host's own /dev/kvm (whatever it is) stays as it is.
set -eu
exec unshare --mount --propagation private sh -eu -c '
  d=$(mktemp -d /tmp/aegis-fakedev-XXXXXX)
  mount -t tmpfs -o mode=755 tmpfs "$d"
  for n in null zero full random urandom tty ptmx; do
    if [ -e "/dev/$n" ]; then touch "$d/$n"; mount --bind "/dev/$n" "$d/$n"; fi
  done
  mkdir "$d/pts" "$d/shm"
  mount --bind /dev/pts "$d/pts"
  mount --bind /dev/shm "$d/shm"
  if [ "${AEGIS_FAKE_KVM:-null}" = null ]; then touch "$d/kvm"; mount --bind /dev/null "$d/kvm"; fi
  mount --rbind "$d" /dev
  exec "$@"
' sh "$@"
