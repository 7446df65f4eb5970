#!/usr/bin/env bash
# Ten thousand tenants on one node (app/examples/bench_scale.rs) against a
# private PostgreSQL cluster set up the way docs/operations.md advises for a
# node of many tenants: shared buffers that hold every tenant's hot pages,
# and room for a backend to keep every relation file it touches open.
#
#   scripts/bench-scale.sh                                   # builds, then runs
#   BENCH=/path/to/examples/bench_scale ROUNDS=5 scripts/bench-scale.sh
#   SHARED_BUFFERS=128MB MAX_FILES=1000 scripts/bench-scale.sh   # PostgreSQL's defaults
#   EXAMPLE=bench_shards WAL_LEVEL=logical scripts/bench-scale.sh # shards: no-op migrate, moves
#
# The cluster is initdb'd in a temporary directory from the newest installed
# PostgreSQL server binaries, listens on 127.0.0.1:$PG_PORT (default 5433),
# and is stopped and removed afterwards. Every other variable (TENANTS,
# ROUNDS, DURATION, BINARIES, SERVER_ENV, ...) goes to bench_scale as is.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_PORT=${PG_PORT:-5433}
SHARED_BUFFERS=${SHARED_BUFFERS:-2GB}
MAX_FILES=${MAX_FILES:-8000}
EXAMPLE=${EXAMPLE:-bench_scale}
WAL_LEVEL=${WAL_LEVEL:-replica}

BIN=$(find /usr/lib/postgresql -maxdepth 3 -name initdb -path '*/bin/*' 2>/dev/null | sort -V | tail -1 | xargs -r dirname)
if [ -z "$BIN" ] && command -v initdb >/dev/null; then
    BIN=$(dirname "$(command -v initdb)")
fi
if [ -z "$BIN" ]; then
    echo "no PostgreSQL server binaries (initdb, pg_ctl) found; install PostgreSQL" >&2
    exit 1
fi
if [ -z "${BENCH:-}" ]; then
    cargo build --release -p plinth --bins --example "$EXAMPLE"
    BENCH=target/release/examples/$EXAMPLE
fi
BENCH=$(realpath "$BENCH")

DIR=$(mktemp -d /tmp/plinth-scale-pg.XXXXXX)
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi
cleanup() {
    as_postgres "$BIN/pg_ctl" -w -m fast -D "$DIR/data" stop >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT

as_postgres "$BIN/initdb" -D "$DIR/data" -A trust -U postgres -E UTF8 --no-instructions >/dev/null
cat >>"$DIR/data/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_buffers = $SHARED_BUFFERS
max_files_per_process = $MAX_FILES
wal_level = $WAL_LEVEL
EOF
# PostgreSQL opens no more files than the process may.
ulimit -n $((MAX_FILES * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
as_postgres "$BIN/pg_ctl" -w -t 60 -D "$DIR/data" -l "$DIR/server.log" start >/dev/null
echo "PostgreSQL: shared_buffers = $SHARED_BUFFERS, max_files_per_process = $MAX_FILES, wal_level = $WAL_LEVEL, 127.0.0.1:$PG_PORT"

cd "$DIR"
DATABASE_URL="postgres://postgres@127.0.0.1:$PG_PORT/postgres" "$BENCH"
