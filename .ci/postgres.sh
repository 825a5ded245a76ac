#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster for the tests (trust auth, loopback
# only, port 55432) and prints its URL. Source-safe: `export
# LINESIDE_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)`.
set -euo pipefail
port=${LINESIDE_TEST_PG_PORT:-55432}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$bin" ]; then
  echo "PostgreSQL is not installed (apt-get install postgresql)" >&2
  exit 1
fi
data=${TMPDIR:-/tmp}/lineside-test-pg
as_pg() {
  # initdb refuses to run as root; the Debian package creates a `postgres` user.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if ! as_pg "$bin/pg_ctl" -D "$data" status >/dev/null 2>&1; then
  rm -rf "$data"
  mkdir -p "$data"
  if [ "$(id -u)" = 0 ]; then chown postgres "$data"; fi
  as_pg "$bin/initdb" -D "$data" -A trust -U postgres >/dev/null
  as_pg "$bin/pg_ctl" -D "$data" -l "$data/server.log" -w \
    -o "-p $port -k $data -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
fi
echo "postgres://postgres@127.0.0.1:$port/postgres"
