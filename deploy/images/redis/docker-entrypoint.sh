#!/bin/sh
# Entrypoint of skiff-test/redis:v1 (deploy/images/build.sh), as the official
# redis image's: `redis-server ...` started as root owns /data (the working
# dir, where redis writes dump.rdb and appendonly files) to redis (998:998)
# and runs as that user (setpriv). Options given as the first arguments go to
# redis-server, and, as there, `--protected-mode no` is added unless the
# arguments (or a config file given first) set protected-mode: the server
# answers clients from other hosts (the published port) without a password.
set -eu

case "${1:-}" in
  -*) set -- redis-server "$@" ;;
esac

if [ "${1:-}" = redis-server ]; then
  protected=""
  case "${2:-}" in
    *.conf) ! grep -q '^protected-mode' "$2" 2>/dev/null || protected=set ;;
  esac
  for arg in "$@"; do
    [ "$arg" != --protected-mode ] || protected=set
  done
  if [ -z "$protected" ]; then
    shift
    case "${1:-}" in
      *.conf) conf="$1"; shift; set -- redis-server "$conf" --protected-mode no "$@" ;;
      *) set -- redis-server --protected-mode no "$@" ;;
    esac
  fi
fi

if [ "${1:-}" = redis-server ] && [ "$(id -u)" = 0 ]; then
  find . \! -user redis -exec chown redis:redis {} \;
  export HOME=/data
  exec /usr/bin/setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi

exec "$@"
