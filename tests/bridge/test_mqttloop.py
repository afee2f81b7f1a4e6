"""AsyncMqtt's write path against a real Mosquitto, no engine: packets queued on the loop are
written at the end of its iteration, corked, so that they leave together; beyond the socket's
buffer the loop watches it for writing until paho's queue is empty; PUBACK futures resolve
through it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from collections.abc import Callable

import pytest
import uvloop

from deploykit.mqttclient import make_client
from deploykit.mqttloop import AsyncMqtt, publish_properties

from .conftest import Broker


async def _connected(
    broker: Broker, name: str, on_message: Callable[[object], None] | None = None
) -> AsyncMqtt:
    """An AsyncMqtt on the running loop, connected to ``broker``."""
    up = asyncio.Event()
    client = AsyncMqtt(
        asyncio.get_running_loop(),
        make_client(name),
        "127.0.0.1",
        broker.port,
        on_message=on_message,
        on_connect=lambda _s: up.set(),
    )
    client.start()
    await asyncio.wait_for(up.wait(), 10)
    return client


def test_a_burst_beyond_the_socket_buffer_arrives_whole_and_in_order(
    broker_factory: Callable[[], Broker],
) -> None:
    """The broker is stopped (SIGSTOP) while the burst is queued, so that the socket fills
    whatever the machine's speed: a running broker may read as fast as paho writes."""
    count, size = 400, 65536  # 26 MB: beyond a socket's send buffer and the peer's receive buffer
    broker = broker_factory()
    assert broker.proc is not None
    pid = broker.proc.pid

    async def main() -> tuple[list[bytes], int, AsyncMqtt]:
        received: list[bytes] = []
        everything = asyncio.Event()

        def on_message(msg: object) -> None:
            received.append(msg.payload)  # type: ignore[attr-defined]
            if len(received) == count + 1:
                everything.set()

        sub = await _connected(broker, "mqttloop-sub", on_message)
        pub = await _connected(broker, "mqttloop-pub")
        await sub.subscribe([("mqttloop/#", 0)])
        props = publish_properties(correlation=b"c" * 16)
        os.kill(pid, signal.SIGSTOP)
        try:
            for i in range(count):
                pub.publish(
                    "mqttloop/part", i.to_bytes(4, "big") * (size // 4), qos=0, properties=props
                )
            done = pub.publish("mqttloop/last", b"last", qos=1, properties=props, track=True)
            assert done is not None
            await asyncio.sleep(0)
            assert pub.client.want_write(), "the burst should fill the socket"
        finally:
            os.kill(pid, signal.SIGCONT)
        code = await asyncio.wait_for(done, 30)
        await asyncio.wait_for(everything.wait(), 30)
        await pub.stop()
        await sub.stop()
        return received, code, pub

    received, code, pub = uvloop.run(main())
    assert code in (0, 16)
    assert received[-1] == b"last"
    assert [int.from_bytes(p[:4], "big") for p in received[:-1]] == list(range(count))
    assert all(len(p) == size for p in received[:-1])
    assert not pub.client.want_write()


def test_a_part_with_the_id_of_a_waiting_reply_does_not_settle_it(broker: Broker) -> None:
    """paho numbers QoS 0 packets from the counter of QoS 1 ids and reports each written one to
    on_publish; once the counter wraps, a stream part can carry the id of a reply still waiting
    for its PUBACK. The counter is set back here so that the next part gets the reply's id at
    once (paho's ``_last_mid``), instead of after 65 535 publishes."""

    async def main() -> tuple[bool, int]:
        pub = await _connected(broker, "mqttloop-wrap")
        reply = pub.publish("mqttloop/reply", b"reply", qos=1, track=True)
        assert reply is not None
        mid = max(pub._pending)  # the reply's id
        pub.client._last_mid = mid - 1  # the next id paho hands out is the reply's again
        pub.publish("mqttloop/part", b"part", qos=0)
        await asyncio.sleep(0)  # the flush wrote both; a PUBACK needs another turn of the loop
        early = reply.done()
        code = await asyncio.wait_for(reply, 10)
        await pub.stop()
        return early, code

    early, code = uvloop.run(main())
    assert not early, "a written QoS 0 part settled the reply before its PUBACK"
    assert code in (0, 16)  # 16: no subscriber


def _segments_sent(sock: socket.socket) -> int:
    """``tcpi_segs_out`` of Linux's ``struct tcp_info`` (linux/tcp.h; offset 136, since 4.2)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 144)
    return int(struct.unpack_from("I", info, 136)[0])


@pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's")
def test_the_packets_of_one_flush_leave_in_few_segments(broker: Broker) -> None:
    """paho sends each packet with its own send(); with Nagle off each would be a TCP segment of
    its own. The flush corks the socket, so a hundred stream parts queued in one turn of the loop
    leave together (a few 64 KiB loopback segments at most, not a hundred)."""
    parts = 100

    async def main() -> int:
        pub = await _connected(broker, "mqttloop-cork")
        sock = pub.client.socket()
        assert isinstance(sock, socket.socket)
        before = _segments_sent(sock)
        props = publish_properties(correlation=b"c" * 16)
        for i in range(parts):
            pub.publish("mqttloop/part", b"%d" % i * 20, qos=0, properties=props)
        await asyncio.sleep(0.05)  # the flush ran at the end of the loop's turn
        sent = _segments_sent(sock) - before
        assert not pub.client.want_write()
        await pub.stop()
        return sent

    sent = uvloop.run(main())
    assert sent <= 5, f"{parts} parts of one flush left in {sent} segments"


def test_a_reply_that_draws_a_taken_id_is_published_under_the_next(broker: Broker) -> None:
    """After paho's id counter wraps, a reply can draw the id of one still waiting for its
    PUBACK; paho refuses it (MQTT_ERR_QUEUE_SIZE), and the bridge dropped the reply. The counter
    is set back here (paho's ``_last_mid``) so that the second reply draws the first one's id
    while that one still waits: both are queued in one step of the loop, before any PUBACK."""

    async def main() -> tuple[list[int], list[bytes]]:
        received: list[bytes] = []
        both = asyncio.Event()

        def on_message(msg: object) -> None:
            received.append(msg.payload)  # type: ignore[attr-defined]
            if len(received) == 2:
                both.set()

        sub = await _connected(broker, "mqttloop-ids-sub", on_message)
        pub = await _connected(broker, "mqttloop-ids")
        await sub.subscribe([("mqttloop/ids", 1)])
        first = pub.publish("mqttloop/ids", b"first", qos=1, track=True)
        assert first is not None
        taken = max(pub._pending)
        pub.client._last_mid = taken - 1  # the next id paho hands out is the waiting reply's
        second = pub.publish("mqttloop/ids", b"second", qos=1, track=True)
        assert second is not None
        assert taken in pub._pending and len(pub._pending) == 2
        codes = await asyncio.wait_for(asyncio.gather(first, second), 10)
        await asyncio.wait_for(both.wait(), 10)
        await pub.stop()
        await sub.stop()
        return list(codes), received

    codes, received = uvloop.run(main())
    assert codes == [0, 0]
    assert sorted(received) == [b"first", b"second"]
