#!/bin/sh
# Install RestFS for mount(8), /etc/fstab and systemd:
#   $PREFIX/bin/restfs, $PREFIX/bin/restfsd   (PREFIX defaults to /usr/local)
#   /sbin/mount.restfs, /sbin/mount.fuse.restfs -> $PREFIX/bin/restfs
# Installs the binaries of target/release (or of $RESTFS_BIN_DIR), building
# them first when they are missing (or with --build).
# Run as root. Uninstall with: install.sh --uninstall
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
prefix=${PREFIX:-/usr/local}
sbin=${SBIN:-/sbin}
bindir=${RESTFS_BIN_DIR:-$here/target/release}

if [ "${1:-}" = "--uninstall" ]; then
    rm -f "$sbin/mount.restfs" "$sbin/mount.fuse.restfs" "$prefix/bin/restfs" "$prefix/bin/restfsd"
    echo "removed RestFS from $prefix/bin and $sbin"
    exit 0
fi

if [ "${1:-}" = "--build" ] || [ ! -x "$bindir/restfs" ] || [ ! -x "$bindir/restfsd" ]; then
    [ -z "${RESTFS_BIN_DIR:-}" ] || { echo "install.sh: no restfs and restfsd in $bindir" >&2; exit 1; }
    (cd "$here" && cargo build --release --locked --bin restfs --bin restfsd)
fi

mkdir -p "$prefix/bin"
# Copy through a temporary name, then rename: a running daemon keeps its binary.
for bin in restfs restfsd; do
    install -m 755 "$bindir/$bin" "$prefix/bin/.$bin.new"
    mv -f "$prefix/bin/.$bin.new" "$prefix/bin/$bin"
done
ln -sfn "$prefix/bin/restfs" "$sbin/mount.restfs"
ln -sfn "$prefix/bin/restfs" "$sbin/mount.fuse.restfs"
echo "installed $prefix/bin/restfs, $prefix/bin/restfsd, $sbin/mount.restfs and $sbin/mount.fuse.restfs"
