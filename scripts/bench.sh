#!/usr/bin/env bash
# HTTP load benchmark: GET /v1/projects/{id} at 32 connections with wrk,
# beside PostgreSQL's own pgbench -S (select-only) at the same concurrency as
# the ceiling, in one run on this machine. Prints the ratio.
#
#   scripts/bench.sh            # 15 s per measurement
#   DURATION=30 scripts/bench.sh
#
# Uses the PostgreSQL server of DATABASE_URL (default 127.0.0.1:5432) and
# recreates databases plinth_bench_http and plinth_bench_pgbench on it.
#
# Plinth runs with WORKERS actix workers (default 1, then 2): on a 2-core
# machine the server, PostgreSQL and wrk share the cores, and one worker
# leaves the second core to PostgreSQL and the load generator. Each
# measurement follows a 2 s warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-15}
CONNS=${CONNS:-32}
PORT=${PORT:-18080}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BASE_URL=${ADMIN_URL%/*}

if ! command -v wrk >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
cargo build --release -q -p plinth

psql -q "$ADMIN_URL" -c 'DROP DATABASE IF EXISTS plinth_bench_http WITH (FORCE)' -c 'CREATE DATABASE plinth_bench_http'
export DATABASE_URL="$BASE_URL/plinth_bench_http" PLINTH_LISTEN="127.0.0.1:$PORT" RUST_LOG=${RUST_LOG:-warn}
./target/release/plinth tenants create bench --name Bench >/dev/null
./target/release/plinth tenants create other --name Other >/dev/null
SERVER=
trap '[ -n "$SERVER" ] && kill $SERVER 2>/dev/null; wait 2>/dev/null || true' EXIT
ID=
for W in ${WORKERS:-1 2}; do
    PLINTH_WORKERS=$W ./target/release/plinth serve >/tmp/plinth-bench-serve.log 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && break; sleep 0.1; done
    if [ -z "$ID" ]; then
        BODY=$(curl -sf -H 'X-Tenant: bench' -H 'content-type: application/json' -d '{"name":"Benchmark project"}' \
            "http://127.0.0.1:$PORT/v1/projects")
        ID=$(echo "$BODY" | sed 's/.*"id":"\([^"]*\)".*/\1/')
        curl -sf -H 'X-Tenant: other' -H 'content-type: application/json' -d '{"name":"Other project"}' \
            "http://127.0.0.1:$PORT/v1/projects" >/dev/null
    fi
    URL="http://127.0.0.1:$PORT/v1/projects/$ID"
    wrk -t2 -c"$CONNS" -d2s -H 'X-Tenant: bench' "$URL" >/dev/null
    echo "== plinth ($W worker(s)): GET /v1/projects/{id}, $CONNS connections, ${DURATION}s"
    wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H 'X-Tenant: bench' "$URL" | tee "/tmp/plinth-bench-wrk-$W.txt"
    kill $SERVER; wait $SERVER 2>/dev/null || true
    SERVER=
done

echo "== ceiling: pgbench -S, $CONNS clients, ${DURATION}s"
psql -q "$ADMIN_URL" -c 'DROP DATABASE IF EXISTS plinth_bench_pgbench WITH (FORCE)' -c 'CREATE DATABASE plinth_bench_pgbench'
pgbench -q -i -s 10 "$BASE_URL/plinth_bench_pgbench" >/dev/null 2>&1
pgbench -S -c"$CONNS" -j2 -T"$DURATION" "$BASE_URL/plinth_bench_pgbench" 2>/dev/null | tee /tmp/plinth-bench-pgbench.txt

TPS=$(awk '/^tps/ {print $3; exit}' /tmp/plinth-bench-pgbench.txt)
echo
echo "== summary (same run, same machine)"
echo "pgbench -S ceiling: ${TPS} tps at $CONNS clients"
for W in ${WORKERS:-1 2}; do
    F=/tmp/plinth-bench-wrk-$W.txt
    RPS=$(awk '/^Requests\/sec/ {print $2}' "$F")
    P50=$(awk '$1=="50%" {print $2}' "$F")
    P99=$(awk '$1=="99%" {print $2}' "$F")
    ERRORS=$(awk '/Non-2xx/ {print $5}' "$F")
    awk -v w="$W" -v r="$RPS" -v t="$TPS" -v p50="$P50" -v p99="$P99" -v e="${ERRORS:-0}" \
        'BEGIN { printf "plinth, %s worker(s): %.0f req/s = %.1f%% of the ceiling, p50 %s, p99 %s, non-2xx %s\n", w, r, 100 * r / t, p50, p99, e }'
done
psql -q "$ADMIN_URL" -c 'DROP DATABASE IF EXISTS plinth_bench_http WITH (FORCE)' -c 'DROP DATABASE IF EXISTS plinth_bench_pgbench WITH (FORCE)'
