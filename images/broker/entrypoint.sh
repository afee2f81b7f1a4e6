#!/bin/sh
# deploykit broker entrypoint: build Mosquitto's password file from the `user:password` lines of the
# mqtt_users secret (hashed in place by `mosquitto_passwd -U`, so no password is ever an argument),
# then start Mosquitto, which drops root to the mosquitto account itself.
set -eu
users=${DEPLOYKIT_MQTT_USERS_FILE:-/run/secrets/mqtt_users}
passwd=/mosquitto/auth/passwd
if [ ! -s "$users" ]; then
  echo "deploykit broker: error: no MQTT accounts in $users" >&2
  echo "deploykit broker: hint: start the stack with 'deploykit up', which generates them" >&2
  exit 3
fi
umask 077
cp "$users" "$passwd"
mosquitto_passwd -U "$passwd"
chown mosquitto:mosquitto "$passwd" /mosquitto/data
chmod 0600 "$passwd"
exec "$@"
