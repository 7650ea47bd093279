#!/usr/bin/env bash
# Azurite (Azure Storage emulator): queue service on 127.0.0.1:10001 and blob service on 127.0.0.1:10000.
# Started with setsid so the servers outlive the shell (and process group) that started them.
# Idempotent: installs azurite@3.35.0 into .services/azurite when missing (3.36+ needs a newer Node), even when
# an Azurite already answers (the restart tests start private ones from it), starts each service only when its
# port does not answer, then waits until both answer.
# Data lives in .services/azurite-data, logs in .services/azurite-{queue,blob}.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
services="$root/.services"
prefix="$services/azurite"
data="$services/azurite-data"
version="3.35.0"
mkdir -p "$services" "$data"

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

bin="$prefix/node_modules/.bin"
installed=$(node -p "require('$prefix/node_modules/azurite/package.json').version" 2>/dev/null || true)
if [[ "$installed" != "$version" ]]; then
  command -v npm >/dev/null || { echo "azurite: npm is not installed (needs Node.js 18 or 20)" >&2; exit 1; }
  echo "azurite: installing azurite@$version into $prefix"
  mkdir -p "$prefix"
  npm install --prefix "$prefix" --no-audit --no-fund --loglevel=error "azurite@$version" >"$services/azurite-npm.log" 2>&1 \
    || { echo "azurite: npm install failed, see $services/azurite-npm.log" >&2; tail -20 "$services/azurite-npm.log" >&2; exit 1; }
fi

if up 10001 && up 10000; then
  echo "azurite: up on 127.0.0.1:10001 (queue) and 127.0.0.1:10000 (blob)"
  exit 0
fi

common=(--location "$data" --skipApiVersionCheck --silent --disableTelemetry)
if ! up 10001; then
  echo "azurite: starting the queue service on 127.0.0.1:10001"
  setsid nohup "$bin/azurite-queue" --queueHost 127.0.0.1 --queuePort 10001 "${common[@]}" \
    >"$services/azurite-queue.log" 2>&1 </dev/null &
  echo $! >"$services/azurite-queue.pid"
fi
if ! up 10000; then
  echo "azurite: starting the blob service on 127.0.0.1:10000"
  setsid nohup "$bin/azurite-blob" --blobHost 127.0.0.1 --blobPort 10000 "${common[@]}" \
    >"$services/azurite-blob.log" 2>&1 </dev/null &
  echo $! >"$services/azurite-blob.pid"
fi

for _ in $(seq 1 150); do
  if up 10001 && up 10000; then
    echo "azurite: up on 127.0.0.1:10001 (queue) and 127.0.0.1:10000 (blob)"
    exit 0
  fi
  sleep 0.2
done
echo "azurite: did not start within 30 s; logs: $services/azurite-queue.log $services/azurite-blob.log" >&2
tail -5 "$services/azurite-queue.log" "$services/azurite-blob.log" >&2 || true
exit 1
