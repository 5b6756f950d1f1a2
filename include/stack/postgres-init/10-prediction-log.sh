#!/usr/bin/env bash
# Creates the prediction-log database next to Airflow's metadata database (POSTGRES_DB).
#
# The official postgres image runs every script in /docker-entrypoint-initdb.d once, on an empty data
# directory, as the POSTGRES_USER superuser; docker-compose mounts include/stack/postgres-init there.
# The same script runs against any PostgreSQL given the usual libpq variables (PGHOST, PGPORT), which is how
# tests/stack runs it. Idempotent: an existing database is left alone.
#
#   CANARY_PREDICTION_DB   name of the prediction-log database (default: predictions)
#   POSTGRES_USER          role that owns it and connects to create it (default: postgres)
#   POSTGRES_DB            database to connect to for the CREATE (default: postgres)
set -euo pipefail

db="${CANARY_PREDICTION_DB:-predictions}"
owner="${POSTGRES_USER:-postgres}"
if [[ ! "$db" =~ ^[a-z_][a-z0-9_]{0,62}$ ]]; then
  echo "CANARY_PREDICTION_DB=${db@Q} is not a plain PostgreSQL name; use lower-case letters, digits, _" >&2
  exit 2
fi

psql_admin=(psql -v ON_ERROR_STOP=1 --no-psqlrc --quiet --username "$owner" --dbname "${POSTGRES_DB:-postgres}")
exists="$("${psql_admin[@]}" --tuples-only --no-align --set=db="$db" <<'SQL'
SELECT 1 FROM pg_database WHERE datname = :'db';
SQL
)"
if [[ "$exists" == "1" ]]; then
  echo "prediction-log database \"$db\" already exists"
  exit 0
fi
"${psql_admin[@]}" --set=db="$db" --set=owner="$owner" <<'SQL'
CREATE DATABASE :"db" OWNER :"owner";
SQL
echo "created prediction-log database \"$db\" (owner \"$owner\")"
