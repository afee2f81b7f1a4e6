"""An asyncio client of a deploykit stack: streams the answer and retries with the same requestId.

    DEPLOYKIT_PASSWORD_FILE=/path/to/mqtt_client_general_password \
        python3 examples/python/chat_client.py --port 1883 --project general "Where is the key?"

`deploykit credentials --project general` prints the port and the password file. Needs paho-mqtt 2
(pip install paho-mqtt). The protocol: deploykit/bridge/README.md.

- The password comes from a file (--password-file, or DEPLOYKIT_PASSWORD_FILE), never argv.
- TCP_NODELAY: paho leaves Nagle's algorithm on, and a request sent right after acknowledging a
  reply then waits ~40 ms for the broker's delayed ACK.
- Retries keep the requestId: if the first attempt was answered after all, the bridge answers the
  repeat from its cache instead of generating again. Retried: no reply within --timeout, and errors
  the envelope marks "retryable" (rate_limited, overloaded, engine_unavailable, timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


class DeployKitClient:
    """One MQTT connection to a project; ``ask`` can be awaited by many tasks at once."""

    def __init__(self, host: str, port: int, project: str, password: str) -> None:
        self.host, self.port, self.project = host, port, project
        self.reply_topic = f"{project}/assistant_response/client-{uuid.uuid4().hex[:12]}"
        self.loop = asyncio.get_running_loop()
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.on_delta: dict[str, Any] = {}
        self.printed: dict[str, int] = {}  # requestId -> last stream seq shown
        self.shown: dict[str, str] = {}  # requestId -> the text streamed so far
        self.ready = self.loop.create_future()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(project, password)
        self.client.on_socket_open = self._nodelay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # paho's network thread calls these; they hand over to the asyncio loop.
    @staticmethod
    def _nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self.loop.call_soon_threadsafe(self._fail, ConnectionError(f"refused: {reason}"))
            return
        client.subscribe([(self.reply_topic, 1), (self.reply_topic + "/stream", 1)])

    def _on_subscribe(self, *_args: Any) -> None:
        self.loop.call_soon_threadsafe(lambda: self.ready.done() or self.ready.set_result(None))

    def _fail(self, err: Exception) -> None:
        if not self.ready.done():
            self.ready.set_exception(err)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self.loop.call_soon_threadsafe(self._dispatch, msg.topic, bytes(msg.payload))

    def _dispatch(self, topic: str, payload: bytes) -> None:
        data = json.loads(payload)
        request_id = data.get("requestId")
        if topic.endswith("/stream"):
            seq = int(data.get("seq", 0))
            if request_id in self.on_delta and seq > self.printed.get(request_id, -1):
                self.printed[request_id] = seq  # a retry may stream again: show each part once
                self.shown[request_id] = self.shown.get(request_id, "") + data["delta"]
                self.on_delta[request_id](data["delta"])
            return
        future = self.pending.get(request_id)
        if future is not None and not future.done():
            future.set_result(data)

    async def connect(self) -> None:
        self.client.connect_async(self.host, self.port)
        self.client.loop_start()
        await asyncio.wait_for(self.ready, 15)

    async def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    async def ask(
        self,
        message: str,
        *,
        session_id: str,
        request_id: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        on_delta: Any = None,
        log: Any = lambda line: None,
    ) -> dict[str, Any]:
        """Send one request and return its reply envelope; retries keep the requestId."""
        request_id = request_id or uuid.uuid4().hex
        request = {
            "sessionId": session_id,
            "requestId": request_id,
            "message": message,
            "replyTopic": self.reply_topic,
            "format": "json",
            "stream": on_delta is not None,
        }
        if on_delta is not None:
            self.on_delta[request_id] = on_delta
        try:
            for attempt in range(retries + 1):
                future = self.loop.create_future()
                self.pending[request_id] = future
                self.client.publish(f"{self.project}/user_input", json.dumps(request), qos=1)
                try:
                    reply = await asyncio.wait_for(future, timeout_s)
                except TimeoutError:
                    why = f"no reply within {timeout_s:g} s"
                else:
                    error = reply.get("error") or {}
                    if reply.get("status") == "ok" and on_delta is not None:
                        # a repeat answered from the cache is not streamed again: show the rest
                        rest = reply["text"][len(self.shown.get(request_id, "")) :]
                        if rest:
                            on_delta(rest)
                    if reply.get("status") == "ok" or not error.get("retryable"):
                        return reply
                    why = f"{error.get('code')}: {error.get('message')}"
                if attempt == retries:
                    raise TimeoutError(f"{why}; gave up after {retries + 1} attempts")
                delay = min(2.0**attempt, 10.0)
                log(f"{why}; retrying with the same requestId in {delay:g} s")
                await asyncio.sleep(delay)
            raise AssertionError("unreachable")
        finally:
            self.pending.pop(request_id, None)
            self.on_delta.pop(request_id, None)
            self.printed.pop(request_id, None)
            self.shown.pop(request_id, None)


def read_password(path: str | None) -> str:
    path = path or os.environ.get("DEPLOYKIT_PASSWORD_FILE")
    if not path:
        sys.exit("error: give --password-file or set DEPLOYKIT_PASSWORD_FILE")
    with open(path) as f:
        return f.read().strip()


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("message")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--project", default="general")
    ap.add_argument("--password-file", help="default: $DEPLOYKIT_PASSWORD_FILE")
    ap.add_argument("--session", default=f"example-{uuid.uuid4().hex[:8]}")
    ap.add_argument("--request-id")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per attempt")
    ap.add_argument("--retries", type=int, default=3)
    ap.add_argument("--max-tokens", type=int)
    args = ap.parse_args()
    client = DeployKitClient(args.host, args.port, args.project, read_password(args.password_file))
    await client.connect()
    try:
        reply = await client.ask(
            args.message,
            session_id=args.session,
            request_id=args.request_id,
            timeout_s=args.timeout,
            retries=args.retries,
            on_delta=lambda text: print(text, end="", flush=True),
            log=lambda line: print(f"[{line}]", file=sys.stderr, flush=True),
        )
    finally:
        await client.close()
    print()
    if reply["status"] != "ok":
        print(f"error {reply['error']['code']}: {reply['error']['message']}", file=sys.stderr)
        return 1
    print(f"[{reply['requestId']}: {reply['usage']}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
