"""A paho-mqtt client driven by an asyncio loop, without paho's network thread.

paho supports external event loops (``on_socket_open``/``on_socket_close``/``on_socket_register_write``/
``on_socket_unregister_write`` with ``loop_read``/``loop_write``/``loop_misc``, paho's
``examples/loop_asyncio.py``; aiomqtt works the same way). Every callback then runs on the loop, so
a message needs no hand-off between threads and PUBACK futures resolve in place. Only the blocking
TCP connect runs in a worker thread; paho is safe to drive from two threads for that moment (its
own ``loop_start`` does the same), and the socket callbacks it makes there are passed to the loop.

Reconnects: after a lost connection the client connects again with exponential backoff (from
``reconnect_min_s`` to ``reconnect_max_s``); paho keeps unacknowledged QoS 1 publishes and sends
them again once connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

MessageHandler = Callable[[mqtt.MQTTMessage], None]


class AsyncMqtt:
    """Drive one paho client from ``loop``. Call every method on the loop's thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: mqtt.Client,
        host: str,
        port: int,
        *,
        keepalive: int = 30,
        clean_start: bool = True,
        connect_properties: Properties | None = None,
        on_message: MessageHandler | None = None,
        on_connect: Callable[[bool], None] | None = None,
        on_disconnect: Callable[[str], None] | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        name: str = "mqtt",
    ) -> None:
        self.loop = loop
        self.client = client
        self.host = host
        self.port = port
        self.keepalive = keepalive
        self.clean_start = clean_start
        self.connect_properties = connect_properties
        self.name = name
        self.connected = False
        self.refused: str | None = None  # the broker's reason when it refused the connection
        self._on_message = on_message
        self._on_connect_cb = on_connect
        self._on_disconnect_cb = on_disconnect
        self._min = reconnect_min_s
        self._max = reconnect_max_s
        self._pending: dict[int, asyncio.Future[int]] = {}
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._flush: asyncio.Handle | None = None  # a write of paho's queue, this loop iteration
        self._writer: Any = None  # the socket the loop watches for writing (it was full)
        self._writing = False  # inside paho's loop_write (see _write)
        self._corkable = False  # the socket is TCP and the system has TCP_CORK (see _write)
        self._lost = asyncio.Event()
        self._loop_thread = threading.get_ident()
        self._prior_socket_open = client.on_socket_open  # e.g. mqttclient's TCP_NODELAY
        client.on_socket_open = self._socket_open
        client.on_socket_close = self._socket_close
        client.on_socket_register_write = self._register_write
        client.on_socket_unregister_write = self._unregister_write
        client.on_connect = self._paho_connect
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        # on_publish only while a tracked publish waits for its PUBACK: paho calls it for every
        # QoS 0 packet too, with a ReasonCode and a Properties built for the call
        client.on_publish = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name=f"{self.name}-connect")

    async def stop(self, timeout_s: float = 3.0, properties: Properties | None = None) -> None:
        """Disconnect cleanly (a DISCONNECT packet: the will is not sent) and stop reconnecting;
        ``properties`` go with the DISCONNECT (e.g. a SessionExpiryInterval of 0)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.connected:
            self.client.disconnect(properties=properties)
            # let the DISCONNECT leave before the socket closes
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lost.wait(), timeout_s)
        self._close_socket()
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        self._pending.clear()
        self.client.on_publish = None

    async def _run(self) -> None:
        delay = self._min
        while not self._stopping:
            self._lost.clear()
            try:
                await self.loop.run_in_executor(None, self._connect_blocking)
            except OSError as err:
                log.warning("%s: cannot reach %s:%s: %s", self.name, self.host, self.port, err)
                self._close_socket()
            else:
                await self._lost.wait()
                if self.connected_once:
                    delay = self._min
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max)

    connected_once = False

    def _connect_blocking(self) -> None:
        """On a worker thread: open the socket and send CONNECT (paho's own connect)."""
        self.client.connect(
            self.host,
            self.port,
            keepalive=self.keepalive,
            clean_start=self.clean_start,
            properties=self.connect_properties,
        )

    def _close_socket(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(sock)
                self.loop.remove_writer(sock)
            with contextlib.suppress(Exception):
                self.client._sock_close()  # paho has no public close without DISCONNECT

    # ------------------------------------------------------------------ paho socket callbacks
    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def _socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._prior_socket_open is not None:
            self._prior_socket_open(client, userdata, sock)
        self._in_loop(self._watch, sock)

    def _watch(self, sock: Any) -> None:
        if sock.fileno() < 0:
            return
        self._corkable = _CORK is not None and getattr(sock, "family", None) in _TCP
        self.loop.add_reader(sock, self._readable)
        if self._misc is None:
            self._misc = self.loop.call_later(1.0, self._tick)

    def _socket_close(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._unwatch, sock)

    def _unwatch(self, sock: Any) -> None:
        if self._writer is sock:
            self._writer = None
        with contextlib.suppress(Exception):
            self.loop.remove_reader(sock)
        with contextlib.suppress(Exception):
            self.loop.remove_writer(sock)

    # Writing: paho calls register-write when it queues a packet while none is waiting, and
    # unregister-write once its queue is empty (it keeps the flag, ``_registered_write``, and calls
    # neither again until the other came). Packets queued on the loop are written by one flush at
    # the end of the loop's current iteration, whatever their number; only when the socket is full
    # (paho keeps the rest of its queue: ``want_write``) does the loop watch it for writing, until
    # paho has written everything. A stream's parts thus cost a send each, not also two epoll_ctl
    # and a wake-up, and the sends of one flush leave the socket together (_set_cork).
    def _register_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._want_write, sock)

    def _want_write(self, sock: Any) -> None:
        if self._flush is None and self._writer is None and sock.fileno() >= 0:
            self._flush = self.loop.call_soon(self._flush_writes)

    def _flush_writes(self) -> None:
        self._flush = None
        if self._writer is not None:
            return  # the socket was full: the loop writes when it has room
        self._write()
        sock = self.client.socket()
        if sock is not None and self.client.want_write() and sock.fileno() >= 0:
            self.loop.add_writer(sock, self._writable)
            self._writer = sock

    def _unregister_write(self, _c: mqtt.Client, _u: Any, sock: Any) -> None:
        self._in_loop(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        if self._writer is sock:
            self._writer = None
            with contextlib.suppress(Exception):
                self.loop.remove_writer(sock)

    def _readable(self) -> None:
        self.client.loop_read()

    def _writable(self) -> None:
        self._write()

    def _write(self) -> None:
        """paho calls on_publish for each QoS 0 packet it writes, with the packet's message id,
        from its id counter shared with QoS 1: after it wraps (65 536 ids; at thousands of stream
        parts a second, within a minute) a part can carry the id of a reply still waiting for its
        PUBACK. A call made while writing is therefore never taken for a PUBACK (those come from
        reads)."""
        self._writing = True
        sock = self.client.socket() if self._corkable else None
        corked = sock is not None and _set_cork(sock, 1)
        try:
            self.client.loop_write()
        finally:
            self._writing = False
            if corked:
                _set_cork(sock, 0)

    def _tick(self) -> None:
        self._misc = None
        if self.client.socket() is None:
            return
        self.client.loop_misc()
        if self.client.socket() is not None:
            self._misc = self.loop.call_later(1.0, self._tick)

    # ------------------------------------------------------------------ paho protocol callbacks
    def _paho_connect(self, _c: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        self._in_loop(self._connected, bool(flags.session_present), reason)

    def _connected(self, session_present: bool, reason: Any) -> None:
        if reason.is_failure:
            self.refused = str(reason)
            log.error("%s: the broker refused the connection: %s", self.name, reason)
            return
        self.refused = None
        self.connected = True
        self.connected_once = True
        if self._on_connect_cb is not None:
            self._on_connect_cb(session_present)

    def _paho_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        self._in_loop(self._disconnected, str(reason))

    def _disconnected(self, reason: str) -> None:
        was = self.connected
        self.connected = False
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._lost.set()
        if was and self._on_disconnect_cb is not None:
            self._on_disconnect_cb(reason)

    def _paho_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message is None:
            return
        try:
            self._on_message(msg)
        except Exception:  # one message never stops the network loop
            log.exception("%s: message handler failed", self.name)

    def _paho_publish(self, _c: mqtt.Client, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        if self._writing:
            return  # a QoS 0 packet went out (see _write), not a PUBACK
        future = self._pending.pop(mid, None)
        if not self._pending:
            self.client.on_publish = None
        if future is not None and not future.done():
            code = int(getattr(reason, "value", 0) or 0)
            future.set_result(code)

    # ------------------------------------------------------------------ publishing and acks
    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Properties | None = None,
        track: bool = False,
    ) -> asyncio.Future[int] | None:
        """Queue a publish. With ``track`` the future resolves at the broker's PUBACK with its
        reason code (0 success, 16 no matching subscribers, >= 128 refused); paho resends an
        unacknowledged QoS 1 publish after a reconnect, so the future waits across it.

        paho numbers QoS 0 packets and QoS 1 messages from one 16-bit counter and refuses a QoS 1
        message whose number is still held by one waiting for its PUBACK (``MQTT_ERR_QUEUE_SIZE``;
        its other cause, ``max_queued_messages``, is never set here). After the counter wraps (a
        reply still waiting for its PUBACK while 65 535 more messages were queued: a broker slow to
        answer for seconds under streaming load) that can happen to a reply; each try takes the
        next number, so it is tried again until a free one comes (at most once per number)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        tries = 1
        while info.rc == mqtt.MQTT_ERR_QUEUE_SIZE and qos > 0 and tries < _MESSAGE_IDS:
            info = self.client.publish(
                topic, payload, qos=qos, retain=retain, properties=properties
            )
            tries += 1
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise MqttPublishError(
                f"cannot queue a message on {topic!r}: {mqtt.error_string(info.rc)}"
            )
        if not track or qos == 0:
            return None
        future: asyncio.Future[int] = self.loop.create_future()
        if not self._pending:
            self.client.on_publish = self._paho_publish
        self._pending[info.mid] = future
        return future

    def ack(self, mid: int, qos: int) -> bool:
        """Acknowledge a received QoS 1 message. False when not connected (the PUBACK is lost: the
        broker sends the message again after the reconnect)."""
        if qos == 0:
            return True
        if not self.connected:
            return False
        return self.client.ack(mid, qos) == mqtt.MQTT_ERR_SUCCESS

    async def subscribe(self, topics: list[tuple[str, int]], timeout_s: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; raises MqttPublishError when any is refused."""
        done: asyncio.Future[list[Any]] = self.loop.create_future()

        def settle(codes: list[Any]) -> None:
            if not done.done():
                done.set_result(codes)

        def on_subscribe(_c: Any, _u: Any, _mid: int, codes: list[Any], _p: Any) -> None:
            self._in_loop(settle, list(codes))

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topics)
        codes = await asyncio.wait_for(done, timeout_s)
        refused = [str(c) for c in codes if getattr(c, "is_failure", False)]
        if refused:
            raise MqttPublishError(f"subscription refused: {', '.join(refused)}")


#: The message ids of MQTT (1 to 65 535), which paho hands out in turn.
_MESSAGE_IDS = 65535

#: Linux's TCP_CORK (None elsewhere), and the socket families it applies to.
_CORK: int | None = getattr(socket, "TCP_CORK", None)
_TCP = (socket.AF_INET, socket.AF_INET6)


def _set_cork(sock: Any, on: int) -> bool:
    """paho sends each queued packet with its own ``send``, and with Nagle off (mqttclient) each
    would leave as a segment of its own, the sender paying the network path (on loopback the
    receiver's too) for every stream part. Corked while paho writes its queue, the packets of one
    flush leave together when the cork comes off. Elsewhere than Linux, or on a socket that is not
    TCP, they go out one by one as before."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, _CORK, on)
    except OSError:  # closed under us: paho sees it on its next read or write
        return False
    return True


class MqttPublishError(Exception):
    """paho could not queue a packet (e.g. a topic it refuses), or a subscription was refused."""


class PublishProperties(Properties):
    """PUBLISH properties that paho packs once: it packs a message's properties at every publish
    (walking all 27 property names), and a stream's parts share one object. Setting a
    property drops the packed bytes; change lists (UserProperty) by setting them, not in place."""

    def pack(self) -> bytes:
        packed: bytes | None = self.__dict__.get("_packed")
        if packed is None:
            packed = super().pack()
            object.__setattr__(self, "_packed", packed)
        return packed

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        self.__dict__.pop("_packed", None)


def publish_properties(
    *,
    correlation: bytes | None = None,
    content_type: str | None = None,
    user_properties: list[tuple[str, str]] | None = None,
    response_topic: str | None = None,
) -> Properties | None:
    if not (correlation or content_type or user_properties or response_topic):
        return None
    props = PublishProperties(PacketTypes.PUBLISH)
    if correlation is not None:
        props.CorrelationData = correlation
    if content_type:
        props.ContentType = content_type
    if user_properties:
        props.UserProperty = user_properties
    if response_topic:
        props.ResponseTopic = response_topic
    return props
