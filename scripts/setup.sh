#!/usr/bin/env bash
# Installs what Kappa's build and tests need on a fresh Debian machine. Idempotent: every
# step is skipped when its tool is already there.
set -euo pipefail

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v psql >/dev/null || need_apt+=(postgresql-client)
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v java >/dev/null || need_apt+=(openjdk-17-jre-headless)
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is required (install Rust with rustup)" >&2
  exit 1
fi

# DuckDB: the independent batch engine the Nexmark oracle test compares window views with.
if ! python3 -c 'import duckdb' 2>/dev/null; then
  echo "setup: installing duckdb"
  python3 -m pip install -q 'duckdb>=1.1'
fi

# The Python client used by the compatibility test (extended protocol).
if ! python3 -c 'import psycopg' 2>/dev/null; then
  echo "setup: installing psycopg"
  python3 -m pip install -q 'psycopg[binary]>=3.1' || python3 -m pip install -q 'psycopg>=3.1'
fi
