#!/bin/sh
# deploykit redis entrypoint: write redis.conf with the password of the redis_password secret (a
# config file on a tmpfs, never an argument or an environment variable), then drop root to the
# redis account and exec redis-server. Append-only file, fsync every second: a restart loses at
# most the last second of session state. `entrypoint.sh --ping` is the health check.
set -eu
secret=${DEPLOYKIT_REDIS_PASSWORD_FILE:-/run/secrets/redis_password}
conf=/run/redis/redis.conf
if [ "${1:-}" = "--ping" ]; then
  # the password goes to redis-cli through its environment variable, never its arguments
  REDISCLI_AUTH=$(cat /run/redis/password) redis-cli -p 6379 ping | grep -q PONG
  exit $?
fi
if [ ! -s "$secret" ]; then
  echo "deploykit redis: error: no password in $secret" >&2
  echo "deploykit redis: hint: start the stack with 'deploykit up', which generates it" >&2
  exit 3
fi
umask 077
install -d -m 0700 -o redis -g redis /run/redis
password=$(cat "$secret")
install -m 0600 -o redis -g redis "$secret" /run/redis/password
printf '%s\n' \
  "bind 0.0.0.0" \
  "port 6379" \
  "protected-mode no" \
  "requirepass $password" \
  "dir /data" \
  "appendonly yes" \
  "appendfsync everysec" \
  "save \"\"" \
  "maxmemory-policy noeviction" \
  "loglevel notice" \
  "logfile \"\"" > "$conf"
chown redis:redis "$conf" /data
exec setpriv --reuid=redis --regid=redis --clear-groups -- "$@"
