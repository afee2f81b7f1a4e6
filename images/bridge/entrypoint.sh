#!/bin/sh
# deploykit bridge entrypoint: copy the secret files (compose secrets, owner-only on the host: MQTT
# credentials, the secret client id and share group, the engine's API key, the Redis password) to
# a private folder owned by the runtime account, point the *_FILE variables at the copies, drop
# root, and exec the bridge. Started as non-root, it changes nothing and execs directly. /run/deploykit is a tmpfs.
set -eu
if [ "$(id -u)" = "0" ]; then
  private=/run/deploykit
  install -d -m 0700 -o deploykit -g deploykit "$private"
  for var in DEPLOYKIT_MQTT_USERNAME_FILE DEPLOYKIT_MQTT_PASSWORD_FILE DEPLOYKIT_CLIENT_ID_FILE \
             DEPLOYKIT_SHARE_GROUP_FILE DEPLOYKIT_ENGINE_API_KEY_FILE DEPLOYKIT_REDIS_PASSWORD_FILE; do
    eval "src=\${$var:-}"
    if [ -n "$src" ] && [ -f "$src" ]; then
      dst="$private/$(basename "$src")"
      install -m 0600 -o deploykit -g deploykit "$src" "$dst"
      export "$var=$dst"
    fi
  done
  exec setpriv --reuid=deploykit --regid=deploykit --clear-groups -- "$@"
fi
exec "$@"
