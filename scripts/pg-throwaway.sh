#!/usr/bin/env bash
# A throwaway PostgreSQL cluster (Debian's postgresql) for `make bench` and manual tries:
#   scripts/pg-throwaway.sh start DIR   -> prints postgres://failback@127.0.0.1:PORT/failback
#   scripts/pg-throwaway.sh stop DIR    -> stops it and removes DIR
# Runs as `nobody` when started as root (PostgreSQL refuses root); trust authentication on
# 127.0.0.1 only; fsync off (benchmarks the service, not the disk). Not for production.
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?DIR}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
[ -x "$bin/initdb" ] || { echo "pg-throwaway: no initdb; install Debian's postgresql (make setup)" >&2; exit 2; }
as=()
[ "$(id -u)" = 0 ] && as=(setpriv --reuid=65534 --regid=65534 --clear-groups --)
case $cmd in
start)
    mkdir -p "$dir"; [ ${#as[@]} = 0 ] || chown 65534:65534 "$dir"; chmod 700 "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U failback --auth=trust --no-sync -E UTF8 --locale=C >"$dir/initdb.log"
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300" start >/dev/null
    "$bin/psql" -h 127.0.0.1 -p "$port" -U failback -d postgres -qc 'CREATE DATABASE failback'
    echo "postgres://failback@127.0.0.1:$port/failback" ;;
stop)
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$dir" ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
