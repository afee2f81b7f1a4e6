#!/bin/sh
# deploykit broker entrypoint: build Mosquitto's password file from the `user:password` lines of the
# mqtt_users secret (hashed in place by `mosquitto_passwd -U`, so no password is ever an argument)
# and the ACL (the image's shared part, then one block per project account), add a TLS listener
# when the stack has a certificate and key (the mqtt_tls_cert and mqtt_tls_key secrets), then start
# Mosquitto, which drops root to the mosquitto account itself. The root filesystem is read-only:
# /mosquitto/auth is a tmpfs.
# `entrypoint.sh --reload-accounts` (run by `deploykit up` on a running stack) only rebuilds the
# password file and the ACL; a SIGHUP then makes the running Mosquitto re-read both.
# The paths can be moved through the environment (the tests build a host broker's files with it).
set -eu
users=${DEPLOYKIT_MQTT_USERS_FILE:-/run/secrets/mqtt_users}
auth=${DEPLOYKIT_BROKER_AUTH_DIR:-/mosquitto/auth}
shared_acl=${DEPLOYKIT_BROKER_SHARED_ACL:-/etc/deploykit/broker/acl}
passwd=$auth/passwd
acl=$auth/acl
# Inside the image this runs as root and hands the files to Mosquitto's account.
own() { if [ "$(id -u)" = 0 ] && id mosquitto >/dev/null 2>&1; then chown mosquitto:mosquitto "$@"; fi; }
if [ ! -s "$users" ]; then
  echo "deploykit broker: error: no MQTT accounts in $users" >&2
  echo "deploykit broker: hint: start the stack with 'deploykit up', which generates them" >&2
  exit 3
fi
umask 077
cp "$users" "$passwd.new"
mosquitto_passwd -U "$passwd.new"
chmod 0600 "$passwd.new"
own "$passwd.new"
mv "$passwd.new" "$passwd"
# Usernames are project names (deploykit/names.py: letters, digits, '_', '.', '-'), so each is one
# word that can stand in an ACL line as it is.
{
  cat "$shared_acl"
  cut -d: -f1 "$users" | while read -r name; do
    [ "$name" = deploykit-bridge ] && continue
    printf '\nuser %s\ntopic readwrite %s/#\ntopic read %s\n' "$name" "$name" "deploykit/bridge/+/status"
  done
} > "$acl.new"
chmod 0644 "$acl.new"
mv "$acl.new" "$acl"
if [ "${1:-}" = "--reload-accounts" ]; then
  exit 0
fi
chown mosquitto:mosquitto /mosquitto/data
conf=$auth/conf.d
mkdir -p "$conf"
cert=${DEPLOYKIT_MQTT_TLS_CERT_FILE:-/run/secrets/mqtt_tls_cert}
key=${DEPLOYKIT_MQTT_TLS_KEY_FILE:-/run/secrets/mqtt_tls_key}
if [ -s "$cert" ] && [ -s "$key" ]; then
  cp "$cert" "$auth/tls_cert.pem"
  cp "$key" "$auth/tls_key.pem"
  own "$auth/tls_cert.pem" "$auth/tls_key.pem"
  printf '%s\n' "listener 8883" "certfile $auth/tls_cert.pem" \
    "keyfile $auth/tls_key.pem" "allow_anonymous false" "password_file $passwd" \
    "acl_file $acl" > "$conf/tls.conf"
  echo "deploykit broker: TLS listener on 8883" >&2
fi
chmod 0755 "$auth" "$conf"
exec "$@"
