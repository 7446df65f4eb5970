#!/usr/bin/env bash
# HTTP load benchmark: GET /v1/projects/{id} at 32 connections with wrk,
# beside PostgreSQL's own pgbench -S (select-only) at the same concurrency as
# the ceiling, on this machine, in alternating rounds. Prints each round's
# ratio and the median. The ceiling is `pgbench -S -M prepared`: Plinth's
# statements are prepared too. The simple-protocol figure is printed beside it.
#
#   scripts/bench.sh                      # 3 rounds of 10 s measurements
#   ROUNDS=5 DURATION=15 scripts/bench.sh
#   WORKERS=1 scripts/bench.sh           # only the 1-worker configuration
#   BUILD=0 scripts/bench.sh             # the release binary as it is, not rebuilt
#   BUILD=0 PLINTH=/path/to/plinth scripts/bench.sh   # another build (say, an older commit's)
#
# Uses the PostgreSQL server of DATABASE_URL (default 127.0.0.1:5432) and
# recreates databases plinth_bench_http and plinth_bench_pgbench on it.
#
# Plinth runs with each of WORKERS actix workers (default "1 2"): on a 2-core machine the
# server, PostgreSQL and wrk share the cores, and one worker leaves the second
# core to PostgreSQL and the load generator. Each measurement follows a 2 s
# warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
PORT=${PORT:-18080}
WORKERS=${WORKERS:-1 2}
PLINTH=${PLINTH:-./target/release/plinth}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BASE_URL=${ADMIN_URL%/*}
OUT=$(mktemp -d)

if ! command -v wrk >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
if [ "${BUILD:-1}" = 1 ]; then cargo build --release -q -p plinth; fi

psql -q "$ADMIN_URL" -c 'DROP DATABASE IF EXISTS plinth_bench_http WITH (FORCE)' -c 'CREATE DATABASE plinth_bench_http' \
    -c 'DROP DATABASE IF EXISTS plinth_bench_pgbench WITH (FORCE)' -c 'CREATE DATABASE plinth_bench_pgbench' 2>/dev/null
pgbench -q -i -s 10 "$BASE_URL/plinth_bench_pgbench" >/dev/null 2>&1
export DATABASE_URL="$BASE_URL/plinth_bench_http" PLINTH_LISTEN="127.0.0.1:$PORT" RUST_LOG=${RUST_LOG:-warn}

SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
    psql -q "$ADMIN_URL" -c 'DROP DATABASE IF EXISTS plinth_bench_http WITH (FORCE)' \
        -c 'DROP DATABASE IF EXISTS plinth_bench_pgbench WITH (FORCE)' 2>/dev/null || true
    rm -rf "$OUT"
}
trap cleanup EXIT

start_server() {
    PLINTH_WORKERS=$1 "$PLINTH" serve >"$OUT/serve.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && return; sleep 0.1; done
    echo "server did not start"; cat "$OUT/serve.log"; exit 1
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }

signup() { # email slug -> session token
    curl -sf -H 'content-type: application/json' "http://127.0.0.1:$PORT/v1/signup" \
        -d "{\"email\":\"$1\",\"password\":\"bench passphrase 1\",\"organization\":\"$2\",\"slug\":\"$2\"}" |
        sed 's/.*"token":"\([^"]*\)".*/\1/'
}
start_server 1
TOKEN=$(signup owner@bench.example.com bench)
OTHER=$(signup owner@other.example.com other)
ID=$(curl -sf -H 'X-Tenant: bench' -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"name":"Benchmark project"}' "http://127.0.0.1:$PORT/v1/projects" | sed 's/.*"id":"\([^"]*\)".*/\1/')
curl -sf -H 'X-Tenant: other' -H "Authorization: Bearer $OTHER" -H 'content-type: application/json' \
    -d '{"name":"Other project"}' "http://127.0.0.1:$PORT/v1/projects" >/dev/null
stop_server
URL="http://127.0.0.1:$PORT/v1/projects/$ID"
AUTH="Authorization: Bearer $TOKEN"

for R in $(seq "$ROUNDS"); do
    for W in $WORKERS; do
        start_server "$W"
        wrk -t2 -c"$CONNS" -d2s -H 'X-Tenant: bench' -H "$AUTH" "$URL" >/dev/null
        wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -H 'X-Tenant: bench' -H "$AUTH" "$URL" >"$OUT/wrk-$W-$R.txt"
        if grep -q Non-2xx "$OUT/wrk-$W-$R.txt"; then
            echo "round $R, $W worker(s): answers other than 2xx; what the server logged:"
            grep -E 'WARN|ERROR' "$OUT/serve.log" | grep -v PLINTH_ENCRYPTION_KEY | tail -5
        fi
        stop_server
    done
    pgbench -S -M prepared -c"$CONNS" -j2 -T"$DURATION" "$BASE_URL/plinth_bench_pgbench" >"$OUT/pgbench-$R.txt" 2>/dev/null
    pgbench -S -c"$CONNS" -j2 -T"$DURATION" "$BASE_URL/plinth_bench_pgbench" >"$OUT/pgbench-simple-$R.txt" 2>/dev/null
    TPS=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench-$R.txt")
    SIMPLE=$(awk '/^tps/ {print $3; exit}' "$OUT/pgbench-simple-$R.txt")
    echo "round $R: pgbench -S -M prepared ceiling ${TPS} tps; simple protocol ${SIMPLE} tps ($CONNS clients, ${DURATION}s)"
    for W in $WORKERS; do
        F="$OUT/wrk-$W-$R.txt"
        awk -v w="$W" -v t="$TPS" -v s="$SIMPLE" '
            /^Requests\/sec/ {r = $2} $1 == "50%" {p50 = $2} $1 == "99%" {p99 = $2} /Non-2xx/ {e = $5}
            END { printf "  plinth, %s worker(s): %.0f req/s = %.1f%% of the ceiling (%.1f%% of simple), p50 %s, p99 %s, non-2xx %d\n", w, r, 100 * r / t, 100 * r / s, p50, p99, e }' "$F" \
            | tee -a "$OUT/summary-$W.txt"
    done
done

echo
echo "== median over $ROUNDS rounds (ratio to the ceiling measured in the same round)"
for W in $WORKERS; do
    sort -t= -k2 -n "$OUT/summary-$W.txt" | awk -v n="$ROUNDS" 'NR == int((n + 1) / 2) { sub(/^ +/, ""); print "median " $0 }'
done
