#!/usr/bin/env bash
# The server's own CPU time per request on the read path (GET
# /v1/projects/{id}, signed in, as in scripts/bench.sh), for one or more
# builds of plinth compared in alternating rounds. Throughput on a 2-core
# machine shared by the server, PostgreSQL and wrk swings with whatever else
# runs; the CPU the server spends per request (perf's task-clock of the
# server process over the requests wrk completed) is much steadier.
#
#   scripts/bench-cpu.sh                                   # this tree's release build
#   BINARIES="/path/to/old/plinth target/release/plinth" ROUNDS=5 scripts/bench-cpu.sh
#
# Each binary gets its own database on DATABASE_URL's server (default
# 127.0.0.1:5432; databases plinth_bench_cpu_N are recreated) and runs with
# one worker; each measurement is DURATION seconds (default 10) of wrk at
# 32 connections after a 2 s warm-up.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
PORT=${PORT:-18081}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BASE_URL=${ADMIN_URL%/*}
OUT=$(mktemp -d)

for tool in wrk perf; do
    if ! command -v "$tool" >/dev/null; then
        package=$([ "$tool" = perf ] && echo linux-perf || echo wrk)
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$package" >/dev/null
    fi
done
if [ -z "${BINARIES:-}" ]; then
    cargo build --release -q -p plinth
    BINARIES=target/release/plinth
fi
read -r -a BINS <<<"$BINARIES"

SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
    for i in "${!BINS[@]}"; do
        psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS plinth_bench_cpu_$i WITH (FORCE)" 2>/dev/null || true
    done
    rm -rf "$OUT"
}
trap cleanup EXIT

start_server() { # binary index
    DATABASE_URL="$BASE_URL/plinth_bench_cpu_$1" PLINTH_LISTEN="127.0.0.1:$PORT" PLINTH_WORKERS=1 \
        PLINTH_DATA_DIR="$OUT/data" RUST_LOG=warn "${BINS[$1]}" serve >"$OUT/serve-$1.log" 2>&1 &
    SERVER=$!
    for _ in $(seq 200); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && return; sleep 0.1; done
    echo "server ${BINS[$1]} did not start"; cat "$OUT/serve-$1.log"; exit 1
}
stop_server() { kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=; }

declare -A URL TOKEN
for i in "${!BINS[@]}"; do
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS plinth_bench_cpu_$i WITH (FORCE)" \
        -c "CREATE DATABASE plinth_bench_cpu_$i" 2>/dev/null
    start_server "$i"
    TOKEN[$i]=$(curl -sf -H 'content-type: application/json' "http://127.0.0.1:$PORT/v1/signup" \
        -d '{"email":"owner@bench.example.com","password":"bench passphrase 1","organization":"bench","slug":"bench"}' |
        sed 's/.*"token":"\([^"]*\)".*/\1/')
    ID=$(curl -sf -H 'X-Tenant: bench' -H "Authorization: Bearer ${TOKEN[$i]}" -H 'content-type: application/json' \
        -d '{"name":"Benchmark project"}' "http://127.0.0.1:$PORT/v1/projects" | sed 's/.*"id":"\([^"]*\)".*/\1/')
    URL[$i]="http://127.0.0.1:$PORT/v1/projects/$ID"
    stop_server
done

for R in $(seq "$ROUNDS"); do
    for i in "${!BINS[@]}"; do
        start_server "$i"
        wrk -t2 -c32 -d2s -H 'X-Tenant: bench' -H "Authorization: Bearer ${TOKEN[$i]}" "${URL[$i]}" >/dev/null
        perf stat -x, -e task-clock -p "$SERVER" -o "$OUT/perf-$i-$R.txt" &
        PERF=$!
        wrk -t2 -c32 -d"${DURATION}s" -H 'X-Tenant: bench' -H "Authorization: Bearer ${TOKEN[$i]}" "${URL[$i]}" \
            >"$OUT/wrk-$i-$R.txt"
        kill -INT "$PERF"; wait "$PERF" 2>/dev/null || true
        stop_server
        awk -F, -v bin="${BINS[$i]}" -v round="$R" -v wrkfile="$OUT/wrk-$i-$R.txt" '
            $3 == "task-clock" { ms = $1 }
            END {
                while ((getline line < wrkfile) > 0) {
                    if (line ~ /requests in/) { split(line, f, " "); n = f[1] }
                    if (line ~ /Non-2xx/) { split(line, f, " "); bad = f[5] }
                }
                printf "round %s  %-40s %8d requests  %6.1f us of server CPU per request  non-2xx %d\n", round, bin, n, 1000 * ms / n, bad
            }' "$OUT/perf-$i-$R.txt" | tee -a "$OUT/summary-$i.txt"
    done
done

echo
echo "== median over $ROUNDS rounds"
for i in "${!BINS[@]}"; do
    awk '{print $6}' "$OUT/summary-$i.txt" | sort -n | awk -v n="$ROUNDS" -v bin="${BINS[$i]}" \
        'NR == int((n + 1) / 2) { printf "%-40s %s us per request\n", bin, $1 }'
done
