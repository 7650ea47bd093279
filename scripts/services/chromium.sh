#!/usr/bin/env bash
# Debian's chromium and chromedriver for the web console's browser tests (tests/observe/test_console_browser.py).
# No service runs; idempotent and quick when both are present. Never downloads a browser of its own: the
# tests drive /usr/bin/chromium through the playwright Python package (executable_path).
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)

if [ ${#missing[@]} -eq 0 ]; then
  echo "chromium: $(command -v chromium) and $(command -v chromedriver) present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "chromium: missing ${missing[*]} and no apt-get here; the console's browser tests will skip" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium: missing ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "chromium: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when the install fails on stale or absent ones.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "chromium: installed ${missing[*]}"
