#!/usr/bin/env bash
# Instructions the server executes per request on the read path (GET
# /v1/projects/{id}, signed in, caches warm), counted by valgrind's
# callgrind: the same count on every run of the same build, whatever else
# the machine is doing, so two builds compare to the instruction. It counts
# user space only (the kernel's TCP path is not in it) and nothing about
# waiting; scripts/bench-cpu.sh and scripts/bench.sh give time.
#
#   scripts/bench-instructions.sh                              # this tree's release build
#   BINARIES="/path/to/old/plinth target/release/plinth" N=500 scripts/bench-instructions.sh
#
# Each binary is set up (migrations, a signed-up tenant, one project) on its
# own database of DATABASE_URL's server (default 127.0.0.1:5432; databases
# plinth_bench_cg_N are recreated), then restarted under callgrind with one
# worker and no job worker; after 20 requests to warm the caches, N
# requests (default 500) on one kept-alive connection are counted.
# KEEP=dir keeps the profiles (dir/callgrind.N.out) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-500}
PORT=${PORT:-18082}
ADMIN_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
BASE_URL=${ADMIN_URL%/*}
OUT=$(mktemp -d)

if ! command -v valgrind >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
fi
if [ -z "${BINARIES:-}" ]; then
    cargo build --release -q -p plinth
    BINARIES=target/release/plinth
fi
read -r -a BINS <<<"$BINARIES"

SERVER=
cleanup() {
    if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
    for i in "${!BINS[@]}"; do
        psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS plinth_bench_cg_$i WITH (FORCE)" 2>/dev/null || true
    done
    rm -rf "$OUT"
}
trap cleanup EXIT

ready() {
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health/ready" >/dev/null && return; sleep 0.2; done
    echo "the server did not start"; exit 1
}

for i in "${!BINS[@]}"; do
    export DATABASE_URL="$BASE_URL/plinth_bench_cg_$i" PLINTH_LISTEN="127.0.0.1:$PORT" PLINTH_WORKERS=1 \
        PLINTH_DATA_DIR="$OUT/data" RUST_LOG=warn
    psql -q "$ADMIN_URL" -c "DROP DATABASE IF EXISTS plinth_bench_cg_$i WITH (FORCE)" \
        -c "CREATE DATABASE plinth_bench_cg_$i" 2>/dev/null
    "${BINS[$i]}" serve >"$OUT/setup-$i.log" 2>&1 &
    SERVER=$!
    ready
    TOKEN=$(curl -sf -H 'content-type: application/json' "http://127.0.0.1:$PORT/v1/signup" \
        -d '{"email":"owner@bench.example.com","password":"bench passphrase 1","organization":"bench","slug":"bench"}' |
        sed 's/.*"token":"\([^"]*\)".*/\1/')
    ID=$(curl -sf -H 'X-Tenant: bench' -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
        -d '{"name":"Benchmark project"}' "http://127.0.0.1:$PORT/v1/projects" | sed 's/.*"id":"\([^"]*\)".*/\1/')
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true

    PLINTH_WORKER=false valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT/cg-$i.out" \
        "${BINS[$i]}" serve >"$OUT/cg-$i.log" 2>&1 &
    SERVER=$!
    ready
    # One kept-alive connection, as wrk and real clients use: the
    # connection's own setup is not in the count.
    python3 - "$PORT" "$TOKEN" "$ID" "$N" "$SERVER" <<'PY'
import http.client, subprocess, sys
port, token, project, n, server = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
conn = http.client.HTTPConnection("127.0.0.1", int(port))
headers = {"X-Tenant": "bench", "Authorization": "Bearer " + token}
def get():
    conn.request("GET", "/v1/projects/" + project, headers=headers)
    answer = conn.getresponse()
    answer.read()
    if answer.status != 200:
        sys.exit(f"answered {answer.status}")
for _ in range(20):
    get()
subprocess.run(["callgrind_control", "-i", "on", server], check=True, capture_output=True)
for _ in range(n):
    get()
subprocess.run(["callgrind_control", "-i", "off", server], check=True, capture_output=True)
PY
    callgrind_control -d "$SERVER" >/dev/null
    kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
    SERVER=
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cat "$OUT"/cg-"$i".out* >"$KEEP/callgrind.$i.out"; fi
    TOTAL=$(cat "$OUT"/cg-"$i".out* | awk '/^totals:|^summary:/ { if ($2 > max) max = $2 } END { print max }')
    printf '%-40s %10d instructions per request (%d requests)\n' "${BINS[$i]}" $((TOTAL / N)) "$N"
done
