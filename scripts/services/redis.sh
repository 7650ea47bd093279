#!/usr/bin/env bash
# Redis on 127.0.0.1:6379 (result store and state store tests).
set -euo pipefail
if (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  echo "redis: up on 127.0.0.1:6379"
  exit 0
fi
echo "redis: starting"
mkdir -p /var/lib/redis /var/log/redis
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /var/lib/redis --logfile /var/log/redis/ci.log
for _ in $(seq 1 50); do
  (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null && { echo "redis: up"; exit 0; }
  sleep 0.2
done
echo "redis: did not start" >&2
exit 1
