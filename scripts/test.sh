#!/usr/bin/env bash
# The whole test suite, as CI runs it. As root it first installs what the privileged
# tests need (e2fsprogs, util-linux, the loop and fuse modules, tracefs); with
# BOOMERANG_PRIVILEGED_TESTS=1 a missing prerequisite fails those tests instead of
# skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v e2fsck >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)
command -v fsfreeze >/dev/null 2>&1 || need_pkgs+=(util-linux)
command -v sha256sum >/dev/null 2>&1 || need_pkgs+=(coreutils)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need_pkgs[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}"
  else
    echo "missing tools (${need_pkgs[*]}); privileged tests will skip or fail" >&2
  fi
fi
if [ "$(id -u)" = 0 ]; then
  [ -e /dev/loop-control ] || modprobe loop 2>/dev/null || true
  [ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
  # The trace source mounts tracefs itself when needed; mounting it here keeps the
  # prerequisite check of the privileged tests simple.
  if [ ! -d /sys/kernel/tracing/events ] && ! grep -q " tracefs " /proc/mounts; then
    mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || true
  fi
fi

# The integration tests run the real binaries: build them first.
cargo build --workspace --bins
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
