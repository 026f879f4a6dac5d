#!/usr/bin/env bash
# Make sure redis-server is on PATH: install Debian's package when we can, else say exactly how.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing Debian's redis-server package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    exit 0
fi
cat >&2 <<'MSG'
redis-server is not installed and this script cannot install it (needs root and apt-get).
Install it, then run make again:
    sudo apt-get install redis-server      # Debian, Ubuntu, Raspberry Pi OS
    brew install redis                     # macOS
MSG
exit 1
