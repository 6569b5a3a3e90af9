#!/bin/sh
# The postgresql container's command: make the cluster at the first start, then run PostgreSQL.
#
# At the first start (an empty data volume) it makes a cluster that takes password logins
# (SCRAM) from the compose network, a role `pacs` with PACS_DATABASE_PASSWORD, and the two
# databases the portal uses, both owned by it: `pacs` (the control plane's) and `pacs_archive`
# (Orthanc's index). Later starts only run PostgreSQL on the cluster there.
set -eu

data=/var/lib/postgresql/data
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

if [ ! -s "$data/PG_VERSION" ]; then
	if [ -z "${PACS_DATABASE_PASSWORD:-}" ]; then
		echo "postgresql-start: set PACS_DATABASE_PASSWORD (see compose.nodes.yaml)" >&2
		exit 1
	fi
	password_file=$(mktemp)
	printf '%s\n' "$PACS_DATABASE_PASSWORD" >"$password_file"
	"$bin/initdb" -D "$data" -U postgres -E UTF8 --auth-local=peer --auth-host=scram-sha-256 \
		--pwfile="$password_file" >/dev/null
	rm -f "$password_file"
	echo "listen_addresses = '*'" >>"$data/postgresql.conf"
	echo "host all all all scram-sha-256" >>"$data/pg_hba.conf"
	"$bin/pg_ctl" -D "$data" -o "-c listen_addresses=''" -w start >/dev/null
	"$bin/psql" -v ON_ERROR_STOP=1 -v password="$PACS_DATABASE_PASSWORD" -U postgres -d postgres >/dev/null <<'SQL'
CREATE ROLE pacs LOGIN PASSWORD :'password';
CREATE DATABASE pacs OWNER pacs;
CREATE DATABASE pacs_archive OWNER pacs;
\c pacs_archive
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
	"$bin/pg_ctl" -D "$data" -m fast -w stop >/dev/null
	echo "postgresql-start: made the cluster, the role pacs and the databases pacs and pacs_archive"
fi
exec "$bin/postgres" -D "$data"
