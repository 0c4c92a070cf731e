#!/usr/bin/env bash
# Builds (or reuses) the Debian root filesystem the systemd end-to-end hosts
# boot from. Cached under $CACHE (default /var/cache/turnout-e2e) and rebuilt
# when this recipe changes. The mirror is the one this machine's apt uses.
set -euo pipefail
CACHE=${CACHE:-/var/cache/turnout-e2e}
recipe="bookworm minbase systemd,systemd-sysv,dbus,iproute2,ca-certificates,procps v1"
stamp="$CACHE/rootfs.recipe"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$recipe" ] && [ -x "$CACHE/rootfs/lib/systemd/systemd" ]; then
    echo "rootfs: cached in $CACHE/rootfs"
    exit 0
fi
mirror=$(grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n 1 | awk '{ print $2 }')
[ -n "$mirror" ] || mirror=$(grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | head -n 1 | awk '{ print $2 }')
[ -n "$mirror" ] || { echo "rootfs: no apt mirror found in /etc/apt" >&2; exit 1; }
rm -rf "$CACHE/rootfs.new"
mkdir -p "$CACHE"
echo "rootfs: debootstrap bookworm from $mirror (a few minutes, once)"
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2,ca-certificates,procps bookworm "$CACHE/rootfs.new" "$mirror" > "$CACHE/debootstrap.log" 2>&1 \
    || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
# Boot quickly and quietly: no getty, no network management, no resolver.
chroot "$CACHE/rootfs.new" systemctl mask console-getty.service getty@tty1.service systemd-networkd.service systemd-resolved.service systemd-timesyncd.service >/dev/null 2>&1 || true
echo "turnout-e2e" > "$CACHE/rootfs.new/etc/hostname"
rm -rf "$CACHE/rootfs"
mv "$CACHE/rootfs.new" "$CACHE/rootfs"
echo "$recipe" > "$stamp"
echo "rootfs: built in $CACHE/rootfs"
