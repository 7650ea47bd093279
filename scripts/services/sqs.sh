#!/usr/bin/env bash
# moto's SQS server on 127.0.0.1:9324 (any credentials, region us-east-1), run from the project's .venv.
# Idempotent: a server that already answers is left alone. Log: .services/moto-sqs.log.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
host=127.0.0.1
port=${TASKSTREAM_SQS_PORT:-9324}
venv="$root/.venv"
logdir="$root/.services"

answers() {
  # moto answers any path; a GET on /moto-api/ is cheap and proves it is moto, not just an open port.
  python3 - "$host" "$port" <<'PY' 2>/dev/null
import sys, urllib.request
urllib.request.urlopen(f"http://{sys.argv[1]}:{sys.argv[2]}/moto-api/", timeout=2).close()
PY
}

if answers; then
  echo "sqs: moto up on $host:$port"
  exit 0
fi
if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
  echo "sqs: port $port is taken by something that is not moto's server" >&2
  exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "sqs: creating $venv"
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import moto, flask, flask_cors' 2>/dev/null || [ ! -x "$venv/bin/moto_server" ]; then
  echo "sqs: installing moto's server into $venv"
  "$venv/bin/pip" install -q 'moto>=5' flask flask-cors
fi

mkdir -p "$logdir"
echo "sqs: starting moto on $host:$port (log $logdir/moto-sqs.log)"
setsid nohup "$venv/bin/moto_server" -H "$host" -p "$port" >>"$logdir/moto-sqs.log" 2>&1 </dev/null &
echo $! >"$logdir/moto-sqs.pid"
for _ in $(seq 1 100); do
  if answers; then
    echo "sqs: up"
    exit 0
  fi
  sleep 0.2
done
echo "sqs: moto did not answer on $host:$port within 20 s; see $logdir/moto-sqs.log" >&2
tail -n 20 "$logdir/moto-sqs.log" >&2 || true
exit 1
