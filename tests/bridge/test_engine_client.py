"""The bridge's engine client and the end of a streamed body, against a real HTTP server on a
socket (aiohttp's), which sends the chunk that ends the body a while after ``data: [DONE]``, as
uvicorn (vLLM's server) can when its two writes reach the client in separate reads: 2 of 256
streamed requests at concurrency 64 opened a new connection against vLLM's CPU server before the
client read bodies to their end, 0 after. aiohttp returns a connection to its pool only when its
response was read to the end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from deploykit.bridge.engine import Completion, EngineClient

from .conftest import free_port

TOKENS = 5


def stand_in(end_after_done_s: float | None) -> web.Application:
    """OpenAI-style chat streams of TOKENS events; the body ends ``end_after_done_s`` after
    ``[DONE]`` (None: not until the client goes away)."""

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "max_model_len": 512}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(TOKENS):
            last = i == TOKENS - 1
            event = {
                "choices": [
                    {"delta": {"content": "x "}, "finish_reason": "length" if last else None}
                ]
            }
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": TOKENS}}
        await response.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        await asyncio.sleep(3600 if end_after_done_s is None else end_after_done_s)
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def streams(end_after_done_s: float | None, n: int) -> tuple[int, list[Completion], float]:
    """n streamed chats one after another: connections opened, final completions, seconds."""
    runner = web.AppRunner(stand_in(end_after_done_s), shutdown_timeout=0.1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    client = EngineClient(f"http://127.0.0.1:{port}", retries=0)
    params: dict[str, Any] = {"max_tokens": TOKENS, "temperature": 0}
    finals: list[Completion] = []
    loop = asyncio.get_running_loop()
    try:
        await client.discover()
        t0 = loop.time()
        for _ in range(n):
            async for item in client.chat_stream([{"role": "user", "content": "hi"}], params):
                if isinstance(item, Completion):
                    finals.append(item)
        seconds = loop.time() - t0
    finally:
        await client.aclose()
        await runner.cleanup()
    return client.connections, finals, seconds


def test_a_body_that_ends_after_done_is_read_so_its_connection_is_used_again() -> None:
    connections, finals, _ = asyncio.run(streams(0.05, 4))
    assert [f.text for f in finals] == ["x " * TOKENS] * 4
    assert [f.completion_tokens for f in finals] == [TOKENS] * 4
    assert connections == 1  # /v1/models and the four streams on one connection


def test_a_body_that_never_ends_costs_a_second_then_its_connection() -> None:
    connections, finals, seconds = asyncio.run(streams(None, 2))
    assert [f.text for f in finals] == ["x " * TOKENS] * 2  # answered all the same
    assert 2.0 <= seconds < 10.0  # about a second each waiting for the end, then given up
    assert connections == 2  # the first connection was closed, not pooled
