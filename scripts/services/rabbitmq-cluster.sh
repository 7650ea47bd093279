#!/usr/bin/env bash
# A private RabbitMQ cluster for the cluster tests (tests/cluster/), on demand; never touches the machine's node.
#
#   rabbitmq-cluster.sh start          start the nodes that are down, join them into one cluster (idempotent)
#   rabbitmq-cluster.sh stop           stop every node of this cluster (idempotent)
#   rabbitmq-cluster.sh status         one line per node: running or down
#   rabbitmq-cluster.sh url            the AMQP URL listing every node (amqp://guest:guest@h1,h2,h3/)
#   rabbitmq-cluster.sh start-node N   start node N again after a crash (it rejoins by itself)
#   rabbitmq-cluster.sh kill-node N    SIGKILL node N (a crash: no goodbye to its peers or clients)
#   rabbitmq-cluster.sh ctl N ARGS...  rabbitmqctl ARGS against node N (the cluster's Erlang cookie)
#   rabbitmq-cluster.sh                (no command, as scripts/services.sh calls it) says how to start it; starts
#                                      nothing: three Erlang nodes take ~30 s and ~400 MB, and the tests that
#                                      need them start them through this script themselves.
#
# Environment (defaults in brackets):
#   RABBITMQ_CLUSTER_DIR        data, logs, cookie and pid files [<repo>/.services/rabbitmq-cluster]
#   RABBITMQ_CLUSTER_NODES      how many nodes [3]
#   RABBITMQ_CLUSTER_PORT       AMQP port of node 1; node N listens on PORT+N-1, distribution on PORT+20000+N-1 [5681]
#   RABBITMQ_CLUSTER_NAME       node name prefix: nodes are NAME1@localhost, NAME2@localhost, ... [tscluster]
#   RABBITMQ_CLUSTER_LISTEN     address the AMQP listeners bind [127.0.0.1]; any other value also lets guest log in
#                               from other hosts (only for the network-namespace tests, which run it in a namespace)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=${RABBITMQ_CLUSTER_DIR:-$root/.services/rabbitmq-cluster}
nodes=${RABBITMQ_CLUSTER_NODES:-3}
base_port=${RABBITMQ_CLUSTER_PORT:-5681}
name=${RABBITMQ_CLUSTER_NAME:-tscluster}
listen=${RABBITMQ_CLUSTER_LISTEN:-127.0.0.1}

server=/usr/lib/rabbitmq/bin/rabbitmq-server  # runs as the caller (Debian's /usr/sbin wrapper switches user)
ctl_bin=/usr/lib/rabbitmq/bin/rabbitmqctl
[ -x "$server" ] || server=$(command -v rabbitmq-server || true)
[ -x "$ctl_bin" ] || ctl_bin=$(command -v rabbitmqctl || true)

node_name() { echo "${name}$1@localhost"; }
node_port() { echo $((base_port + $1 - 1)); }
node_dir() { echo "$dir/node$1"; }

need_binaries() {
  if [ -z "$server" ] || [ -z "$ctl_bin" ]; then
    echo "rabbitmq-cluster: rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)" >&2
    exit 3
  fi
}

cookie() {
  mkdir -p "$dir/home"
  if [ ! -s "$dir/home/.erlang.cookie" ]; then
    (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' | tr a-f A-F > "$dir/home/.erlang.cookie")
  fi
  chmod 400 "$dir/home/.erlang.cookie"
}

ctl() {
  local n=$1
  shift
  HOME="$dir/home" ERL_EPMD_ADDRESS=127.0.0.1 "$ctl_bin" -n "$(node_name "$n")" "$@"
}

running() { ctl "$1" -q ping >/dev/null 2>&1; }

start_node() {
  local n=$1 d port
  d=$(node_dir "$n")
  port=$(node_port "$n")
  if running "$n"; then
    echo "rabbitmq-cluster: $(node_name "$n") already running on $listen:$port"
    return 0
  fi
  mkdir -p "$d/mnesia" "$d/log"
  if [ "$listen" = "127.0.0.1" ]; then
    printf 'listeners.tcp.local = 127.0.0.1:%s\n' "$port" > "$d/rabbitmq.conf"
  else
    printf 'listeners.tcp.default = %s\nloopback_users.guest = false\n' "$port" > "$d/rabbitmq.conf"
  fi
  echo "[]." > "$d/enabled_plugins"
  : > "$d/rabbitmq-env.conf"
  rm -f "$d/rabbitmq.pid"
  env -i PATH="$PATH" LANG=C.UTF-8 HOME="$dir/home" \
    RABBITMQ_NODENAME="$(node_name "$n")" \
    RABBITMQ_NODE_PORT="$port" \
    RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_MNESIA_BASE="$d/mnesia" \
    RABBITMQ_LOG_BASE="$d/log" \
    RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
    RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
    RABBITMQ_PID_FILE="$d/rabbitmq.pid" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    "$server" -detached >>"$d/server.out" 2>&1
  local waited=0
  until ctl "$n" -q await_startup --timeout 10 >/dev/null 2>&1; do
    waited=$((waited + 10))
    if [ "$waited" -ge 120 ]; then
      echo "rabbitmq-cluster: $(node_name "$n") did not start within 120 s; see $d/log and $d/server.out" >&2
      tail -n 20 "$d/server.out" >&2 || true
      exit 1
    fi
    sleep 1
  done
  echo "rabbitmq-cluster: $(node_name "$n") up on $listen:$port"
}

member_of_first() { ctl 1 -q cluster_status --formatter json 2>/dev/null | grep -q "\"$(node_name "$1")\""; }

join_node() {
  local n=$1
  if member_of_first "$n"; then
    return 0
  fi
  echo "rabbitmq-cluster: joining $(node_name "$n") to $(node_name 1)"
  local out
  out="$(node_dir "$n")/join.out"
  if ! { ctl "$n" -q stop_app && ctl "$n" -q reset && ctl "$n" -q join_cluster "$(node_name 1)" &&
    ctl "$n" -q start_app; } >"$out" 2>&1; then
    echo "rabbitmq-cluster: joining $(node_name "$n") failed:" >&2
    tail -n 20 "$out" >&2
    exit 1
  fi
}

stop_node() {
  local n=$1 d
  d=$(node_dir "$n")
  if running "$n"; then
    ctl "$n" -q stop >/dev/null 2>&1 || true
  fi
  if [ -s "$d/rabbitmq.pid" ]; then  # a node that did not stop cleanly
    kill -9 "$(cat "$d/rabbitmq.pid")" 2>/dev/null || true
    rm -f "$d/rabbitmq.pid"
  fi
  echo "rabbitmq-cluster: $(node_name "$n") stopped"
}

kill_node() {
  local d
  d=$(node_dir "$1")
  if [ ! -s "$d/rabbitmq.pid" ]; then
    echo "rabbitmq-cluster: no pid file for $(node_name "$1")" >&2
    exit 1
  fi
  kill -9 "$(cat "$d/rabbitmq.pid")"
  rm -f "$d/rabbitmq.pid"
  echo "rabbitmq-cluster: $(node_name "$1") killed"
}

url() {
  local hosts="" n host=$listen
  [ "$host" = "0.0.0.0" ] && host=127.0.0.1
  for n in $(seq 1 "$nodes"); do
    hosts="$hosts${hosts:+,}$host:$(node_port "$n")"
  done
  echo "amqp://guest:guest@$hosts/"
}

case "${1:-}" in
  start)
    need_binaries
    cookie
    for n in $(seq 1 "$nodes"); do start_node "$n"; done
    for n in $(seq 2 "$nodes"); do join_node "$n"; done
    echo "rabbitmq-cluster: $nodes node(s) up: $(url)"
    ;;
  stop)
    need_binaries
    for n in $(seq "$nodes" -1 1); do stop_node "$n"; done
    ;;
  status)
    need_binaries
    for n in $(seq 1 "$nodes"); do
      if running "$n"; then echo "$(node_name "$n") running"; else echo "$(node_name "$n") down"; fi
    done
    ;;
  url) url ;;
  start-node) need_binaries; cookie; start_node "${2:?node number}" ;;
  kill-node) kill_node "${2:?node number}" ;;
  ctl) need_binaries; n=${2:?node number}; shift 2; ctl "$n" "$@" ;;
  "")
    echo "rabbitmq-cluster: on demand only (tests/cluster start it); run: bash $0 start"
    ;;
  *)
    echo "usage: $0 start|stop|status|url|start-node N|kill-node N|ctl N ARGS..." >&2
    exit 2
    ;;
esac
