#!/usr/bin/env bash
#! Starts a throw-away PostgreSQL on a free loopback port for one test run.
#!
#! Usage: eval "$(scripts/test-postgres.sh start DIR)"  → exports
#! STRATUS_TEST_PG_URL and STRATUS_TEST_PG_DIR; scripts/test-postgres.sh stop DIR.
#! As root, the server runs as the `postgres` user (initdb refuses root).
#! Tests run it without fsync (a throw-away database); STRATUS_PG_DURABLE=1
#! keeps PostgreSQL's default durability, for benchmarks whose figures claim
#! durable commits (`stratus bench api --backend postgres`).
set -euo pipefail

cmd=${1:?start|stop}
dir=${2:?data directory}

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ] || [ ! -x "$bin/postgres" ]; then
    echo "test-postgres: PostgreSQL server not installed; run scripts/setup-host.sh" >&2
    exit 1
fi
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
    mkdir -p "$dir"
    if [ "$(id -u)" -eq 0 ]; then chown postgres:postgres "$dir"; fi
    as_pg "$bin/initdb" -A trust -U postgres --no-sync -E UTF8 -D "$dir/data" >"$dir/initdb.log" 2>&1
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    if [ "${STRATUS_PG_DURABLE:-0}" = 1 ]; then
        unsafe=""
    else
        unsafe="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    fi
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 \
        -o "-p $port -h 127.0.0.1 -k $dir $unsafe -c max_connections=300" \
        start >/dev/null
    echo "export STRATUS_TEST_PG_URL=postgres://postgres@127.0.0.1:$port/postgres"
    echo "export STRATUS_TEST_PG_DIR=$dir"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_pg "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
