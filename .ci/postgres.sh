#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on localhost for the sweep's real-database test; idempotent.
#
#   eval "$(bash .ci/postgres.sh)"      # sets RANKALLOC_TEST_PG_URL in the calling shell
#
# Installs PostgreSQL (apt-get) when it is missing, creates a cluster in $RANKALLOC_PG_DIR (default
# /tmp/rankalloc-pg) owned by the postgres user (initdb refuses to run as root), starts it on
# 127.0.0.1:$RANKALLOC_PG_PORT (default 5433, so that it never meets a system cluster on 5432), creates
# the role and database 'rankalloc' (password auth over TCP), and installs psycopg2-binary into the
# Python on PATH (the active venv).  Running it again reuses whatever is already there.
# Everything but the final 'export ...' line goes to stderr.
set -euo pipefail

PORT="${RANKALLOC_PG_PORT:-5433}"
DIR="${RANKALLOC_PG_DIR:-/tmp/rankalloc-pg}"
USER_NAME=rankalloc
PASSWORD=rankalloc
DB=rankalloc
PYTHON="${PYTHON:-python}"
log() { echo "postgres.sh: $*" >&2; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
if [ -z "$(bindir)" ] || [ ! -x "$(bindir)/initdb" ]; then
    log "installing PostgreSQL"
    as_root apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql >&2
fi
BIN="$(bindir)"

# The server runs as the postgres user when we are root, else as ourselves.
if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    RUN_AS=postgres
    run() { runuser -u postgres -- "$@"; }
else
    RUN_AS="$(id -un)"
    run() { "$@"; }
fi

if [ ! -f "$DIR/PG_VERSION" ]; then
    log "creating a cluster in $DIR"
    mkdir -p "$DIR"
    chown "$RUN_AS" "$DIR"
    chmod 700 "$DIR"
    run "$BIN/initdb" -D "$DIR" -U postgres --auth-local=trust --auth-host=scram-sha-256 >/dev/null
fi

start() {
    run "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 \
        -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=100" start >&2
}
if ! run "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1; then
    log "starting the server on 127.0.0.1:$PORT"
    if ! start; then  # a server killed with its machine leaves lock files behind
        log "start failed; removing stale lock files and trying again (log: $DIR/server.log)"
        rm -f "$DIR/postmaster.pid" "$DIR/.s.PGSQL.$PORT.lock"
        start
    fi
fi

psql_admin() { run "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -tAq "$@"; }
if [ "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$USER_NAME'")" != 1 ]; then
    psql_admin -c "CREATE ROLE $USER_NAME LOGIN PASSWORD '$PASSWORD'"
fi
if [ "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$DB'")" != 1 ]; then
    psql_admin -c "CREATE DATABASE $DB OWNER $USER_NAME"
fi

if ! "$PYTHON" -c "import psycopg2" 2>/dev/null; then
    log "installing psycopg2-binary into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
    "$PYTHON" -m pip install -q "psycopg2-binary>=2.9" >&2
fi

URL="postgresql://$USER_NAME:$PASSWORD@127.0.0.1:$PORT/$DB"
"$PYTHON" - "$URL" <<'EOF' >&2
import sys
import psycopg2
psycopg2.connect(sys.argv[1], connect_timeout=10).close()
print("postgres.sh: server reachable at", sys.argv[1].split("@")[1])
EOF
echo "export RANKALLOC_TEST_PG_URL=$URL"
