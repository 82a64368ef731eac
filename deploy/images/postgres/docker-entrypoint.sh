#!/bin/sh
# Entrypoint of skiff-test/postgres:v1 (deploy/images/build.sh): the official
# postgres image's docker-entrypoint.sh conventions, in busybox sh.
#
#   PGDATA                     data directory (default /var/lib/postgresql/data)
#   POSTGRES_PASSWORD[_FILE]   the superuser's password; required to initialise
#                              unless POSTGRES_HOST_AUTH_METHOD=trust
#   POSTGRES_USER[_FILE]       the superuser (default postgres)
#   POSTGRES_DB[_FILE]         a database created at initialisation
#                              (default $POSTGRES_USER)
#   POSTGRES_INITDB_ARGS       more initdb arguments (default here:
#                              --encoding=UTF8 --locale=C, as the image has no
#                              locales)
#   POSTGRES_HOST_AUTH_METHOD  the pg_hba method for host connections
#                              (default scram-sha-256, postgres' own default)
#   /docker-entrypoint-initdb.d/*.sh, *.sql, *.sql.gz  run once, at initialisation
#
# Started as root, it owns PGDATA (and the socket dir) to postgres (999:999)
# and runs itself again as that user with setpriv. An empty PGDATA (no
# PG_VERSION) is initialised with initdb; then `postgres` runs in the
# foreground, listening on *:5432 (listen_addresses='*' in the sample config).
set -eu

# file_env VAR: VAR's value from $VAR or from the file named by $VAR_FILE.
file_env() {
  eval "fe_val=\${$1:-}; fe_file=\${$1_FILE:-}"
  if [ -n "$fe_val" ] && [ -n "$fe_file" ]; then
    echo "error: both $1 and $1_FILE are set (but are exclusive)" >&2
    exit 1
  fi
  if [ -n "$fe_file" ]; then
    fe_val="$(cat "$fe_file")"
  fi
  export "$1=$fe_val"
  unset "$1_FILE"
}

export PGDATA="${PGDATA:-/var/lib/postgresql/data}"

# `postgres -c name=value` given as the command's first arguments.
case "${1:-}" in
  -*) set -- postgres "$@" ;;
esac

if [ "${1:-}" = postgres ] && [ "$(id -u)" = 0 ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  find "$PGDATA" \! -user postgres -exec chown postgres:postgres {} \;
  chmod 700 "$PGDATA"
  chown postgres:postgres /var/run/postgresql
  chmod 3777 /var/run/postgresql
  export HOME=/var/lib/postgresql
  exec /usr/bin/setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

if [ "${1:-}" = postgres ] && [ ! -s "$PGDATA/PG_VERSION" ]; then
  file_env POSTGRES_PASSWORD
  file_env POSTGRES_USER
  file_env POSTGRES_DB
  file_env POSTGRES_INITDB_ARGS
  if [ -z "$POSTGRES_PASSWORD" ] && [ "${POSTGRES_HOST_AUTH_METHOD:-}" != trust ]; then
    cat >&2 <<'EOM'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser (or POSTGRES_PASSWORD_FILE naming a file that holds it).

       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
       connections without a password. This is *not* recommended.
EOM
    exit 1
  fi
  user="${POSTGRES_USER:-postgres}"
  db="${POSTGRES_DB:-$user}"
  mkdir -p "$PGDATA"
  chmod 700 "$PGDATA" 2>/dev/null || :

  pwfile=""
  if [ -n "$POSTGRES_PASSWORD" ]; then
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  fi
  # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is a list of words
  initdb --username="$user" ${pwfile:+--pwfile="$pwfile"} --encoding=UTF8 --locale=C \
    ${POSTGRES_INITDB_ARGS:-}
  [ -z "$pwfile" ] || rm -f "$pwfile"

  method="${POSTGRES_HOST_AUTH_METHOD:-$(postgres -C password_encryption)}"
  if [ "$method" = trust ]; then
    echo "warning: POSTGRES_HOST_AUTH_METHOD=trust: every host connection is let in without a password" >&2
  fi
  printf '\nhost all all all %s\n' "$method" >>"$PGDATA/pg_hba.conf"

  # A server on the unix socket only, for the database and the init scripts.
  pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p 5432" -w start
  export PGPASSWORD="$POSTGRES_PASSWORD"
  psql_init() { psql -v ON_ERROR_STOP=1 --username "$user" --no-password --no-psqlrc "$@"; }
  if [ "$db" != postgres ]; then
    exists="$(echo "SELECT 1 FROM pg_database WHERE datname = :'db';" |
      psql_init --dbname postgres --set db="$db" -tA)"
    if [ -z "$exists" ]; then
      echo 'CREATE DATABASE :"db";' | psql_init --dbname postgres --set db="$db"
    fi
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh)
        if [ -x "$f" ]; then echo "running $f"; "$f"; else echo "sourcing $f"; . "$f"; fi ;;
      *.sql) echo "running $f"; psql_init --dbname "$db" -f "$f" ;;
      *.sql.gz) echo "running $f"; gunzip -c "$f" | psql_init --dbname "$db" ;;
      *) [ ! -e "$f" ] || echo "ignoring $f" ;;
    esac
  done
  unset PGPASSWORD
  pg_ctl -D "$PGDATA" -m fast -w stop
  echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
