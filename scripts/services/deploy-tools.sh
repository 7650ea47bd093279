#!/usr/bin/env bash
# OS tools the deployment tests use (no service runs; idempotent and quick when everything is present):
#   systemd-analyze  verifies rendered systemd units            (Debian: systemd)
#   cloud-init       checks rendered cloud-config files          (Debian: cloud-init)
#   docker-compose   1.29's `config` checks docker-compose.yml   (Debian: docker-compose; no engine needed)
#   promtool         checks deploy/prometheus and the dashboard's PromQL; `prometheus` scrapes the native stack
#                    (Debian: prometheus; its service is not started)
# Python-side validators (check-jsonschema, kubernetes-validate) come with the dev extras.
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v cloud-init >/dev/null 2>&1 || missing+=(cloud-init)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)

if [ ${#missing[@]} -eq 0 ]; then
  echo "deploy-tools: systemd-analyze, cloud-init, docker-compose and promtool present"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "deploy-tools: missing ${missing[*]} and no apt-get here; the tests that need them will skip" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "deploy-tools: missing ${missing[*]}; run as root (or: sudo apt-get install ${missing[*]})" >&2
  exit 0
fi
echo "deploy-tools: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Only refresh the package lists when the install fails on stale or absent ones.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "deploy-tools: installed ${missing[*]}"
