#!/usr/bin/env python3
"""What streaming costs the bridge's engine client, without an engine: a stand-in OpenAI server
(in a subprocess) streams N tokens SPACING seconds apart, batching ``stream_interval`` tokens per
event after the first as vLLM does (vllm/v1/engine/output_processor.py: the first and the final
output are sent at once); the bridge's EngineClient reads them. Prints the client process's CPU per
request, whole and streamed, for each tokens-per-event setting (1, 4, 8, and `auto`: the bridge's
pacer, fed as the bridge feeds it), and the CPU per wake-up of a bare
asyncio read loop on this machine (the floor).

    .venv/bin/python benchmarks/stream_cost.py [--tokens 128] [--spacing 0.01] [--requests 8]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import time

SERVER = r"""
import asyncio, json, sys
from aiohttp import web
spacing = float(sys.argv[2])
async def models(_r):
    return web.json_response({"data": [{"id": "stand-in", "max_model_len": 4096}]})
async def chat(r):
    body = await r.json()
    n, every = int(body["max_tokens"]), int(body.get("stream_interval") or 1)
    if not body.get("stream"):
        await asyncio.sleep(n * spacing)
        return web.json_response({"choices": [{"message": {"content": "x " * n},
            "finish_reason": "length"}], "usage": {"prompt_tokens": 9, "completion_tokens": n}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(r)
    pending = 0
    for i in range(n):
        await asyncio.sleep(spacing)
        pending += 1
        if i == 0 or pending >= every or i == n - 1:
            delta = {"content": "x " * pending}
            await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta,
                "finish_reason": None}]}).encode() + b"\n\n")
            pending = 0
    await resp.write(b"data: " + json.dumps({"choices": [], "usage": {"prompt_tokens": 9,
        "completion_tokens": n}}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    return resp
app = web.Application()
app.add_routes([web.get("/v1/models", models), web.post("/v1/chat/completions", chat)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


#: The bridge's default publishing interval for stream parts (bridge/config.py).
STREAM_INTERVAL_S = 0.1


def cpu_ms() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return (r.ru_utime + r.ru_stime) * 1000


async def measure(url: str, tokens: int, requests: int) -> list[str]:
    from deploykit.bridge.engine import Completion, EngineClient
    from deploykit.bridge.pacing import pacer_for

    engine = EngineClient(url)
    await engine.discover()
    messages = [{"role": "user", "content": "hi"}]
    out = []
    settings: list[tuple[str, int | str]] = [("whole", 1)]
    settings += [("stream", every) for every in (1, 4, 8, "auto")]
    for mode, every in settings:
        # the bridge's pacer for this setting, fed as the bridge feeds it (bridge/service.py)
        pacer = pacer_for(every, STREAM_INTERVAL_S)
        start, t0, events = cpu_ms(), time.perf_counter(), 0
        for _ in range(requests):
            if mode == "whole":
                await engine.chat(messages, {"max_tokens": tokens})
                continue
            first = None
            async for item in engine.chat_stream(
                messages, {"max_tokens": tokens}, tokens_per_event=pacer.tokens_per_event()
            ):
                events += 1
                if isinstance(item, Completion) and first is not None:
                    pacer.observe(item.completion_tokens - 1, time.monotonic() - first)
                elif first is None:
                    first = time.monotonic()
        per = (cpu_ms() - start) / requests
        label = "whole" if mode == "whole" else f"streamed, {every} token(s) per event"
        out.append(
            f"{label:32} {per:6.2f} ms CPU per request "
            f"({events / requests:.0f} reads, {(time.perf_counter() - t0) / requests:.2f} s each)"
        )
    await engine.aclose()
    return out


async def wakeup_floor(reads: int = 400) -> str:
    """A bare asyncio loop reading 200-byte messages 10 ms apart from another process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.listen()
        sender = subprocess.Popen(
            [sys.executable, "-c",
             "import socket,sys,time\n"
             f"c=socket.create_connection(('127.0.0.1',{port}))\n"
             f"[(time.sleep(0.01), c.sendall(b'x'*200)) for _ in range({reads})]\n"],
        )  # fmt: skip
        conn, _ = s.accept()
        conn.setblocking(False)
        reader, _writer = await asyncio.open_connection(sock=conn)
        start, n = cpu_ms(), 0
        while await reader.read(65536):
            n += 1
        sender.wait()
    return f"{'bare asyncio read loop':32} {1000 * (cpu_ms() - start) / max(n, 1):6.0f} us CPU per read ({n} reads)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--spacing", type=float, default=0.01, help="seconds between tokens")
    p.add_argument("--requests", type=int, default=8)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(args.spacing)])
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        lines = asyncio.run(measure(f"http://127.0.0.1:{port}", args.tokens, args.requests))
        lines.append(asyncio.run(wakeup_floor()))
    finally:
        server.terminate()
        server.wait(10)
    print(f"{args.tokens} tokens, {args.spacing * 1000:.0f} ms apart:")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
