#!/usr/bin/env bash
# Install the PostgreSQL server binaries for the distributed autotuner test (Debian packages).
#
# The test (tests/test_autotune_postgres.py) starts its own throwaway server from these binaries
# (initdb + pg_ctl in a temporary folder, loopback only, a free port) and drops it afterwards, so
# nothing is started here. To use an existing server instead, export
#   MAMBA3_TEST_POSTGRES_URL=postgresql+psycopg2://user@host:port/db
# The Python driver (psycopg2-binary) comes from pip with the [tune] extra.
set -euo pipefail

find_initdb() {
  command -v initdb 2>/dev/null && return 0
  ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1
}

if [ -z "$(find_initdb)" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "postgres.sh: PostgreSQL is missing and installing it needs root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends postgresql >/dev/null
fi

initdb_path="$(find_initdb)"
if [ -z "$initdb_path" ]; then
  echo "postgres.sh: initdb not found after installing postgresql" >&2
  exit 1
fi
echo "postgres.sh: PostgreSQL server binaries in $(dirname "$initdb_path")"
