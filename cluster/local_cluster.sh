#!/usr/bin/env bash
# A real two-node Ray cluster on this machine (head + one worker node on 127.0.0.1), to try
# multi-node LMD training locally:
#
#   cluster/local_cluster.sh start [PORT] [CPUS_PER_NODE]   # prints the address
#   lmd train --workers 2 --spread --address 127.0.0.1:PORT --dataset synthetic
#   cluster/local_cluster.sh stop [PORT]
#
# `stop` ends only the processes of the cluster this script started (found by its private temp
# dir or its exact GCS address), never another Ray on the machine, unlike `ray stop`. PORT must be
# an integer in 1024-65535 and CPUS_PER_NODE a positive integer: they are checked before anything
# is started, killed or removed.
set -euo pipefail
cmd=${1:-start}
port=${2:-6389}
cpus=${3:-2}
if ! [[ "$port" =~ ^[0-9]{4,5}$ ]] || (( 10#$port < 1024 || 10#$port > 65535 )); then
  echo "local_cluster.sh: error: PORT=$port: must be an integer in 1024-65535" >&2; exit 2
fi
if ! [[ "$cpus" =~ ^[0-9]{1,4}$ ]] || (( 10#$cpus < 1 )); then
  echo "local_cluster.sh: error: CPUS_PER_NODE=$cpus: must be a positive integer" >&2; exit 2
fi
port=$((10#$port))
tmp="/tmp/lmd-cluster-$port"
export RAY_AUTH_MODE=token  # Ray 2.60 clusters started by `ray start` require token auth
ray_bin=${RAY_BIN:-ray}

case "$cmd" in
  start)
    mkdir -p "$tmp"
    "$ray_bin" start --head --port="$port" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
      --temp-dir="$tmp" --include-dashboard=false --disable-usage-stats >"$tmp/head.log" 2>&1
    "$ray_bin" start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 --num-cpus="$cpus" \
      --disable-usage-stats >"$tmp/worker.log" 2>&1
    echo "127.0.0.1:$port"
    ;;
  stop)
    # Every process of this cluster carries its temp dir or its GCS address on the command line; the
    # port must end there (6390 must not match 63901), the temp dir must be followed by / or a non-digit.
    pids=$(pgrep -f -- "$tmp(/|[^0-9]|\$)|127\.0\.0\.1:$port([^0-9]|\$)" || true)
    [ -n "$pids" ] && kill -9 $pids 2>/dev/null || true
    rm -rf "$tmp"
    ;;
  *) echo "usage: $0 start|stop [PORT] [CPUS_PER_NODE]" >&2; exit 2 ;;
esac
