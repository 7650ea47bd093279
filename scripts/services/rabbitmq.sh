#!/usr/bin/env bash
# RabbitMQ on 127.0.0.1:5672 (guest/guest): the machine usually runs it; start it when it is down.
set -euo pipefail
if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "rabbitmq: up on 127.0.0.1:5672"
  exit 0
fi
echo "rabbitmq: starting"
rabbitmq-server -detached
rabbitmqctl await_startup --timeout 120
echo "rabbitmq: up"
