#!/usr/bin/env bash
# Run the whole test suite on a fresh machine: bring what the tests need
# (pjdfstest 0.2.2, fsx 0.3.2 and s3s-fs 0.14.1, built into target/tools), then `cargo
# test` for every crate. The tests start their own restfsd servers and real FUSE mounts,
# so this runs as root with /dev/fuse available.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh: the tests mount FUSE filesystems and switch users; run as root" >&2
    exit 1
fi
if [ ! -c /dev/fuse ]; then
    echo "scripts/test.sh: /dev/fuse is missing (modprobe fuse?)" >&2
    exit 1
fi
for tool in umount findmnt cp truncate; do
    command -v "$tool" >/dev/null || { echo "scripts/test.sh: $tool is required" >&2; exit 1; }
done

tools="$PWD/target/tools"
if ! "$tools/bin/pjdfstest" --version 2>/dev/null | grep -q '0\.2\.2'; then
    echo "==> installing pjdfstest 0.2.2 into $tools"
    cargo install --locked --quiet --root "$tools" pjdfstest --version 0.2.2
fi
export PJDFSTEST="$tools/bin/pjdfstest"
if ! "$tools/bin/fsx" --version 2>/dev/null | grep -q '0\.3\.2'; then
    echo "==> installing fsx 0.3.2 into $tools"
    cargo install --locked --quiet --root "$tools" fsx --version 0.3.2
fi
export FSX="$tools/bin/fsx"
if ! "$tools/bin/s3s-fs" --version 2>/dev/null | grep -q '0\.14\.1'; then
    echo "==> installing s3s-fs 0.14.1 (an S3 server for the S3 block store tests) into $tools"
    cargo install --locked --quiet --root "$tools" s3s-fs --version 0.14.1 --features binary
fi
export S3S_FS="$tools/bin/s3s-fs"

echo "==> cargo test"
cargo test --workspace --all-targets "$@"
