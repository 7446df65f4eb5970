#!/usr/bin/env bash
# Runs Plinth's whole test suite on a fresh machine: installs what the tests
# need (PostgreSQL's server binaries, PgBouncer, HAProxy, Chromium with
# playwright-core, promtool, a Python environment with schemathesis), makes
# sure PostgreSQL is running, then runs cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else "$@"; fi; }

# PostgreSQL's server binaries: the tests use the server on 127.0.0.1:5432
# when one answers, and start clusters of their own (TLS, restarts, and all
# of them when nothing answers) from the binaries. Installed without a cluster
# of the package's own: Debian's would ask for a password on 127.0.0.1.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null; then
    echo "installing PostgreSQL (the tests start clusters of their own from its binaries)"
    conf=/etc/postgresql-common/createcluster.conf
    if [ -f "$conf" ]; then
        as_root sed -i 's/^#\?\s*create_main_cluster.*/create_main_cluster = false/' "$conf"
    else
        as_root mkdir -p "$(dirname "$conf")"
        echo "create_main_cluster = false" | as_root tee "$conf" >/dev/null
    fi
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >/dev/null
fi

if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "installing pgbouncer (the PgBouncer isolation test needs it)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq pgbouncer >/dev/null
fi

if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    echo "installing haproxy (the rolling-restart test runs three instances behind it)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq haproxy >/dev/null
fi

if ! command -v chromium >/dev/null; then
    echo "installing chromium (the API reference page, the operator console and passkeys are tested in a browser)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
fi

# playwright-core drives that chromium through the operator console and the
# passkey ceremonies (with its virtual authenticators)
# (tests/browser); from the npm registry, exactly as locked, installed again
# when the lock changes. It downloads no browser of its own.
if ! command -v npm >/dev/null; then
    echo "installing Node.js and npm (the console's browser tests run on them)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nodejs npm >/dev/null
fi
if ! cmp -s tests/browser/package-lock.json tests/browser/node_modules/.plinth-lock 2>/dev/null; then
    echo "installing playwright-core (the console's and the passkeys' browser tests need it)"
    (cd tests/browser && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
    cp tests/browser/package-lock.json tests/browser/node_modules/.plinth-lock
fi
# oidc-provider, the OpenID Connect provider tests/sso.rs signs in through
# (tests/oidc); from the npm registry, exactly as locked, like the above.
if ! cmp -s tests/oidc/package-lock.json tests/oidc/node_modules/.plinth-lock 2>/dev/null; then
    echo "installing oidc-provider (the single sign-on tests need it)"
    (cd tests/oidc && npm ci --no-audit --no-fund --loglevel=error)
    cp tests/oidc/package-lock.json tests/oidc/node_modules/.plinth-lock
fi

# promtool checks and tests the alert rules (deploy/prometheus). Only the
# tool is taken from Debian's prometheus package, unpacked under target/,
# so that installing it starts no Prometheus server.
tools="$PWD/target/tools"
if ! command -v promtool >/dev/null && [ ! -x "$tools/usr/bin/promtool" ]; then
    echo "installing promtool (the alert rule tests need it)"
    mkdir -p "$tools/deb"
    as_root apt-get update -qq
    (cd "$tools/deb" && apt-get download -qq prometheus)
    dpkg-deb --fsys-tarfile "$tools"/deb/prometheus_*.deb | tar -x -C "$tools" ./usr/bin/promtool
    rm -rf "$tools/deb"
fi
export PATH="$PATH:$tools/usr/bin"

# schemathesis and an OpenAPI validator (tests/contract.rs) and a SCIM client
# (tests/scim.rs), from PyPI, in a virtual environment; installed again when
# scripts/requirements-test.txt changes.
venv="$tools/venv"
if ! cmp -s scripts/requirements-test.txt "$venv/requirements-test.txt" 2>/dev/null; then
    echo "installing schemathesis, openapi-spec-validator and scim2-client (the contract and SCIM tests need them)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -r scripts/requirements-test.txt
    cp scripts/requirements-test.txt "$venv/requirements-test.txt"
fi

# With DATABASE_URL unset the tests use PostgreSQL on 127.0.0.1:5432, or start
# a private cluster from the installed server binaries if nothing answers.
# Start the machine's own cluster first if there is one and it is down.
if [ -z "${DATABASE_URL:-}" ] && ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null && [ -n "$(ls /etc/postgresql 2>/dev/null)" ]; then
        for v in /etc/postgresql/*; do
            as_root pg_ctlcluster --skip-systemctl-redirect "$(basename "$v")" main start || true
        done
    fi
fi

cargo test --workspace --locked "$@"
