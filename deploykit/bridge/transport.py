"""MQTT transport of the bridge (paho-mqtt 2.x, MQTT 5), used from one asyncio loop.

- A persistent session: ``clean_start=False`` and a ``SessionExpiryInterval`` (without it the broker
  keeps nothing), a stable client id, reconnect with backoff (paho's loop, 1 to 30 s).
- ``manual_ack``: the owner acknowledges each request itself (``ack``), after its reply's PUBACK.
- The MQTT 5 Receive Maximum tells the broker how many unacknowledged requests it may send.
- A retained status topic, ``online`` on each connect, ``offline`` as the last will and on stop.
- Paho's network thread is never blocked: every callback only hands its data to the loop with
  ``call_soon_threadsafe``. ``publish`` returns a future that resolves at the PUBACK; because PUBACKs
  also arrive through the loop, the future is always registered before its PUBACK is handled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from deploykit.mqttclient import BrokerAddress, Credentials, connect_properties, make_client

log = logging.getLogger("deploykit.bridge")


class MqttTransport:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: BrokerAddress,
        client_id: str,
        *,
        credentials: Credentials | None,
        subscriptions: list[str],
        status_topic: str,
        session_expiry_s: int,
        receive_maximum: int,
        on_message: Callable[[mqtt.MQTTMessage], None],
    ) -> None:
        self._loop = loop
        self.address = address
        self.client_id = client_id
        self.subscriptions = subscriptions
        self.status_topic = status_topic
        self.connected = False
        self._on_message_cb = on_message
        self._pending: dict[int, asyncio.Future[None]] = {}
        client = make_client(client_id, credentials=credentials, manual_ack=True)
        client.will_set(status_topic, "offline", qos=1, retain=True)
        client.max_inflight_messages_set(max(20, receive_maximum))
        client.max_queued_messages_set(0)  # replies are never dropped by paho
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        self._client = client
        self._connect_props = connect_properties(
            session_expiry_s=session_expiry_s, receive_maximum=receive_maximum
        )

    def start(self) -> None:
        self._client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=30,
            clean_start=False,
            properties=self._connect_props,
        )
        self._client.loop_start()
        log.info("connecting to %s as %s", self.address, self.client_id)

    async def stop(self) -> None:
        """Publish ``offline`` (the will is only sent on an unclean end), then disconnect."""
        if self.connected:
            info = self._client.publish(self.status_topic, "offline", qos=1, retain=True)
            await self._loop.run_in_executor(None, info.wait_for_publish, 3.0)
        self._client.disconnect()
        self._client.loop_stop()

    # ------------------------------------------------------------ paho callbacks (network thread)
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            log.error("the broker refused the connection: %s", reason)
            return
        log.info("connected to %s (session present: %s)", self.address, flags.session_present)
        opts = SubscribeOptions(qos=1)
        client.subscribe([(topic, opts) for topic in self.subscriptions])
        client.publish(self.status_topic, "online", qos=1, retain=True)
        self._call(self._set_connected, True)

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        log.warning("disconnected from the broker: %s", reason)
        self._call(self._set_connected, False)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        self._call(self._on_message_cb, msg)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        self._call(self._puback, mid, reason)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------ loop side
    def _set_connected(self, value: bool) -> None:
        self.connected = value

    def _puback(self, mid: int, reason: Any) -> None:
        future = self._pending.pop(mid, None)
        if future is not None and not future.done():
            if reason is not None and getattr(reason, "is_failure", False):
                # "no matching subscribers" (16) is a success code; failures are >= 0x80
                log.warning("reply %d refused by the broker: %s", mid, reason)
            future.set_result(None)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        correlation: bytes | None = None,
        content_type: str | None = None,
        user_properties: list[tuple[str, str]] | None = None,
        track: bool = True,
    ) -> asyncio.Future[None] | None:
        """Publish at QoS 1 (call on the loop). With ``track`` the future resolves at the PUBACK;
        paho keeps the message across a reconnect and resends it, so it resolves once the broker
        has it."""
        props = Properties(PacketTypes.PUBLISH)
        if correlation is not None:
            props.CorrelationData = correlation
        if content_type:
            props.ContentType = content_type
        if user_properties:
            props.UserProperty = user_properties
        info = self._client.publish(topic, payload, qos=1, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("cannot queue a message on %s: %s", topic, mqtt.error_string(info.rc))
        if not track:
            return None
        future: asyncio.Future[None] = self._loop.create_future()
        self._pending[info.mid] = future
        return future

    def ack(self, mid: int, qos: int) -> None:
        """Acknowledge a received message (QoS > 0), so the broker drops it from the session."""
        if qos > 0:
            self._client.ack(mid, qos)
