#!/usr/bin/env bash
# Start (or check) every service the test suite talks to. Idempotent: a running service is left alone.
# Each scripts/services/<name>.sh starts one service and waits until it answers.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for script in "$here"/services/*.sh; do
  echo "== service: $(basename "$script" .sh)"
  bash "$script"
done
