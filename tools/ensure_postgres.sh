#!/usr/bin/env bash
# Make sure a PostgreSQL server runs on 127.0.0.1:5432 (install it with apt-get where it is missing,
# create and start the cluster where it is down) and print an administrative URL on stdout.
# Used by .ci/run and `make bench`. Honours an existing FHIR_TEST_POSTGRES_URL.
set -euo pipefail

log() { printf '[postgres] %s\n' "$*" >&2; }

if [ -n "${FHIR_TEST_POSTGRES_URL:-}" ]; then
  echo "$FHIR_TEST_POSTGRES_URL"
  exit 0
fi

as_postgres() {
  if command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"; else su postgres -s /bin/sh -c "$(printf '%q ' "$@")"; fi
}

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  log "PostgreSQL is not installed: installing it with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >&2
  apt-get install -y -q postgresql postgresql-client >&2
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)
if ! ls /etc/postgresql/"$version"/main >/dev/null 2>&1; then
  log "creating PostgreSQL $version cluster 'main'"
  pg_createcluster "$version" main --port 5432 >&2
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  log "starting PostgreSQL $version"
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || pg_ctlcluster "$version" main start >&2
fi
for _ in $(seq 1 60); do
  pg_isready -h 127.0.0.1 -p 5432 -q && break
  sleep 1
done
pg_isready -h 127.0.0.1 -p 5432 -q || { log "PostgreSQL did not come up"; exit 1; }

if psql "postgresql://postgres@127.0.0.1:5432/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1; then
  echo "postgresql://postgres@127.0.0.1:5432/postgres"
else
  # Password authentication on TCP (Debian's default): give the postgres role a throw-away password.
  password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
  as_postgres psql -q -c "ALTER ROLE postgres PASSWORD '$password'" >&2
  echo "postgresql://postgres:$password@127.0.0.1:5432/postgres"
fi
log "PostgreSQL ready"
