#!/usr/bin/env bash
# Install the headless browser used by the `browser`-marked tests (tests/test_explorer_browser.py).
#
# The tests drive Debian's `chromium` package through the `playwright` Python package
# (pointed at /usr/bin/chromium; `playwright install` is NOT needed and not used).
# Usage: scripts/install_browser.sh   (as root, e.g. in CI or a container)
set -euo pipefail

CHROMIUM="${CRYOSIAM_NB_CHROMIUM:-/usr/bin/chromium}"

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: chromium already present at $CHROMIUM ($("$CHROMIUM" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install_browser: $CHROMIUM is missing and this is not root, so it cannot be installed here." >&2
    echo "  Install it yourself (Debian/Ubuntu: sudo apt-get install -y chromium) or set" >&2
    echo "  CRYOSIAM_NB_CHROMIUM=/path/to/chromium; browser tests will be skipped until then." >&2
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get on this system; install a Chromium build and set" >&2
    echo "  CRYOSIAM_NB_CHROMIUM=/path/to/chromium; browser tests will be skipped until then." >&2
    exit 0
fi

echo "install_browser: installing Debian chromium with apt-get ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium
echo "install_browser: installed $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM")"
