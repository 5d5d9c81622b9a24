#!/usr/bin/env bash
# Install the Debian packages the test suite relies on, but only those that
# are missing. Without root (and without sudo) it prints what is missing and
# exits successfully; tests that need those tools skip themselves.
set -euo pipefail

# With arguments: install just those packages (when missing).
PACKAGES=(
    qemu-utils
    fio
    nbdkit
    libnbd-bin
    iproute2
    e2fsprogs
    util-linux
    procps
)
if [[ $# -gt 0 ]]; then
    PACKAGES=("$@")
fi

if ! command -v dpkg-query >/dev/null 2>&1; then
    echo "install-deps: dpkg-query not found (not a Debian-based system); skipping." >&2
    echo "install-deps: please install manually: ${PACKAGES[*]}" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "install-deps: all system packages present."
    exit 0
fi

echo "install-deps: missing packages: ${missing[*]}"

if [[ "$(id -u)" -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "install-deps: not root and passwordless sudo unavailable; not installing." >&2
    echo "install-deps: run as root: apt-get install -y --no-install-recommends ${missing[*]}" >&2
    echo "install-deps: tests needing these tools will be skipped." >&2
    exit 0
fi

"${SUDO[@]}" apt-get update
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
echo "install-deps: installed: ${missing[*]}"
