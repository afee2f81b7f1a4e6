#!/bin/sh
# deploykit broker entrypoint: build Mosquitto's password file from the `user:password` lines of the
# mqtt_users secret (hashed in place by `mosquitto_passwd -U`, so no password is ever an argument),
# add a TLS listener when the stack has a certificate and key (the mqtt_tls_cert and mqtt_tls_key
# secrets), then start Mosquitto, which drops root to the mosquitto account itself. The root
# filesystem is read-only: /mosquitto/auth is a tmpfs.
# `entrypoint.sh --reload-accounts` (run by `deploykit up` on a running stack) only rebuilds the
# password file; a SIGHUP then makes the running Mosquitto re-read it.
set -eu
users=${DEPLOYKIT_MQTT_USERS_FILE:-/run/secrets/mqtt_users}
passwd=/mosquitto/auth/passwd
if [ ! -s "$users" ]; then
  echo "deploykit broker: error: no MQTT accounts in $users" >&2
  echo "deploykit broker: hint: start the stack with 'deploykit up', which generates them" >&2
  exit 3
fi
umask 077
cp "$users" "$passwd.new"
mosquitto_passwd -U "$passwd.new"
chmod 0600 "$passwd.new"
chown mosquitto:mosquitto "$passwd.new"
mv "$passwd.new" "$passwd"
if [ "${1:-}" = "--reload-accounts" ]; then
  exit 0
fi
chown mosquitto:mosquitto /mosquitto/data
conf=/mosquitto/auth/conf.d
mkdir -p "$conf"
cert=${DEPLOYKIT_MQTT_TLS_CERT_FILE:-/run/secrets/mqtt_tls_cert}
key=${DEPLOYKIT_MQTT_TLS_KEY_FILE:-/run/secrets/mqtt_tls_key}
if [ -s "$cert" ] && [ -s "$key" ]; then
  cp "$cert" /mosquitto/auth/tls_cert.pem
  cp "$key" /mosquitto/auth/tls_key.pem
  chown mosquitto:mosquitto /mosquitto/auth/tls_cert.pem /mosquitto/auth/tls_key.pem
  printf '%s\n' "listener 8883" "certfile /mosquitto/auth/tls_cert.pem" \
    "keyfile /mosquitto/auth/tls_key.pem" "allow_anonymous false" "password_file $passwd" \
    "acl_file /etc/deploykit/broker/acl" > "$conf/tls.conf"
  echo "deploykit broker: TLS listener on 8883" >&2
fi
chmod 0755 /mosquitto/auth "$conf"
exec "$@"
