"""Small helpers for MQTT 5 clients (paho-mqtt 2.x), shared by the bridge, the health check, chat
and the benchmark.

Public API:
- ``parse_broker_url("mqtt://host:1883")`` -> ``BrokerAddress``
- ``read_credentials(username_file, password_file)`` -> ``Credentials | None`` (files only, never argv)
- ``make_client(client_id, ...)`` -> an MQTTv5 paho client, not yet connected
- ``connect_client(address, ...)`` -> a connected client with its network loop running
- ``request(address, project, message, ...)`` -> ``Reply``: publish one request, wait for its reply
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploykit import names
from deploykit.errors import CheckFailed, UsageError
from deploykit.ports import MQTT_PORT, MQTT_TLS_PORT


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens: plain TCP (``mqtt://``) or TLS (``mqtts://``, verified against the
    system's CAs or ``ca_file``)."""

    host: str
    port: int = MQTT_PORT
    tls: bool = False
    ca_file: str | None = None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str | None = field(default=None, repr=False)


def parse_broker_url(url: str, ca_file: str | Path | None = None) -> BrokerAddress:
    """Parse ``mqtt://HOST[:PORT]`` (also a bare ``HOST[:PORT]``) or ``mqtts://HOST[:PORT]``
    (TLS, port 8883 by default; ``ca_file`` verifies a certificate no system CA signed)."""
    text = url.strip()
    if "://" not in text:
        text = "mqtt://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
        raise UsageError(
            f"unsupported broker URL scheme {parts.scheme!r} in {url!r}",
            hint="use mqtt://HOST:PORT, or mqtts://HOST:PORT for TLS",
        )
    tls = parts.scheme in ("mqtts", "ssl")
    if parts.username or parts.password:
        raise UsageError(
            "the broker URL must not carry credentials",
            hint="pass them in files: --mqtt-username-file and --mqtt-password-file",
        )
    if not parts.hostname:
        raise UsageError(f"no host in broker URL {url!r}", hint="use mqtt://HOST:PORT")
    try:
        port = parts.port or (MQTT_TLS_PORT if tls else MQTT_PORT)
    except ValueError as err:
        raise UsageError(f"bad port in broker URL {url!r}", hint="use mqtt://HOST:PORT") from err
    if ca_file is not None and not Path(ca_file).is_file():
        raise UsageError(f"the CA file {ca_file} does not exist", "pass the PEM file's path")
    return BrokerAddress(parts.hostname, port, tls, str(ca_file) if ca_file else None)


def use_tls(client: mqtt.Client, address: BrokerAddress) -> None:
    """Make ``client`` speak TLS when the address says so (certificate and host name verified)."""
    if address.tls:
        client.tls_set(ca_certs=address.ca_file)


def read_secret(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip("\r\n")
    except OSError as err:
        raise UsageError(
            f"cannot read the {what} file {str(path)!r}: {err.strerror}",
            hint="check the path and its permissions",
        ) from err


def read_credentials(
    username_file: str | Path | None, password_file: str | Path | None
) -> Credentials | None:
    """Credentials from files (trailing newline stripped). No username file: anonymous (None)."""
    if not username_file:
        if password_file:
            raise UsageError(
                "an MQTT password file was given without a username file",
                hint="pass --mqtt-username-file too",
            )
        return None
    username = read_secret(username_file, "MQTT username")
    if not username:
        raise UsageError(f"the MQTT username file {str(username_file)!r} is empty")
    password = read_secret(password_file, "MQTT password") if password_file else None
    return Credentials(username, password)


def make_client(
    client_id: str = "",
    *,
    credentials: Credentials | None = None,
    manual_ack: bool = False,
) -> mqtt.Client:
    """An MQTT 5 paho client (callback API 2), not yet connected."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    if credentials is not None:
        client.username_pw_set(credentials.username, credentials.password)
    client.on_socket_open = _set_nodelay
    return client


def _set_nodelay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle's algorithm: paho does not, and small MQTT packets (a reply, then the PUBACK
    of its request) otherwise wait for the peer's delayed ACK, tens of ms each."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect_properties(
    session_expiry_s: int | None = None, receive_maximum: int | None = None
) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    if session_expiry_s is not None:
        props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    return props


def connect_client(
    address: BrokerAddress,
    client_id: str = "",
    *,
    credentials: Credentials | None = None,
    clean_start: bool = True,
    session_expiry_s: int | None = None,
    timeout_s: float = 10.0,
    keepalive: int = 30,
) -> mqtt.Client:
    """Connect a client and start its network loop; raise ``CheckFailed`` when it cannot connect."""
    client = make_client(client_id, credentials=credentials)
    use_tls(client, address)
    connected = threading.Event()
    result: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        result["reason"] = reason
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(
            address.host,
            address.port,
            keepalive=keepalive,
            clean_start=clean_start,
            properties=connect_properties(session_expiry_s),
        )
    except (OSError, ssl.SSLError) as err:
        raise CheckFailed(
            f"cannot reach the MQTT broker at {address}: {err}",
            hint="check that the broker runs and the address is right",
        ) from err
    client.loop_start()
    if not connected.wait(timeout_s):
        client.loop_stop()
        raise CheckFailed(f"no answer from the MQTT broker at {address} in {timeout_s:.0f} s")
    reason = result["reason"]
    if reason.is_failure:
        client.loop_stop()
        raise CheckFailed(
            f"the MQTT broker at {address} refused the connection: {reason}",
            hint="check the username and password files and the broker's ACL",
        )
    return client


@dataclass
class Reply:
    """One reply to a request: its topic, raw payload, and the parsed envelope when it is JSON."""

    topic: str
    payload: bytes
    correlation_data: bytes | None = None
    user_properties: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.payload)


def request(
    address: BrokerAddress,
    project: str,
    message: str,
    *,
    credentials: Credentials | None = None,
    session_id: str | None = None,
    timeout_s: float = 60.0,
    fields: dict[str, Any] | None = None,
    client_id: str = "",
) -> Reply:
    """Publish one request on ``{project}/user_input`` and wait for its reply.

    Uses an MQTT 5 Response Topic and Correlation Data (on a fresh topic under the project) and asks
    for the JSON envelope. ``fields`` adds or overrides payload fields (e.g. ``maxTokens``).
    Raises ``CheckFailed`` on timeout or when the broker refuses the client.
    """
    session_id = session_id or f"req-{uuid.uuid4().hex[:12]}"
    request_id = uuid.uuid4().hex
    reply_topic = f"{names.default_reply_topic(project, session_id)}/{request_id[:8]}"
    payload: dict[str, Any] = {
        "sessionId": session_id,
        "message": message,
        "requestId": request_id,
        "format": "json",
    }
    payload.update(fields or {})
    correlation = request_id.encode()
    client = connect_client(address, client_id, credentials=credentials)
    got = threading.Event()
    reply: list[Reply] = []
    subscribed = threading.Event()

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        corr = getattr(props, "CorrelationData", None) if props else None
        if corr is not None and corr != correlation:
            return
        users = dict(getattr(props, "UserProperty", []) or []) if props else {}
        reply.append(Reply(msg.topic, bytes(msg.payload), corr, users))
        got.set()

    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    try:
        client.subscribe(reply_topic, qos=1)
        if not subscribed.wait(timeout_s):
            raise CheckFailed(f"the broker at {address} did not confirm the reply subscription")
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_topic
        props.CorrelationData = correlation
        info = client.publish(
            names.request_topic(project), json.dumps(payload), qos=1, properties=props
        )
        deadline = time.monotonic() + timeout_s
        info.wait_for_publish(timeout_s)
        if not got.wait(max(0.0, deadline - time.monotonic())):
            raise CheckFailed(
                f"no reply on {reply_topic} within {timeout_s:.0f} s",
                hint=f"check that the bridge runs ({names.status_topic('+')}) and the engine is up",
            )
        return reply[0]
    finally:
        client.disconnect()
        client.loop_stop()
