#!/usr/bin/env python3
"""What streaming costs the bridge's engine client, without an engine: a stand-in OpenAI server
(in a subprocess) streams N tokens SPACING seconds apart, batching ``stream_interval`` tokens per
event after the first as vLLM does (vllm/v1/engine/output_processor.py: the first and the final
output are sent at once); the bridge's EngineClient reads them. Prints the client process's CPU per
request, whole and streamed, for each tokens-per-event setting (1, 4, 8, and `auto`: the bridge's
pacer, fed as the bridge feeds it), and the CPU per wake-up of a bare
read loop on this machine (the floor). Each event loop named in ``--loops`` (asyncio's own, uvloop:
the bridge's) runs all of it, in turns (``--rounds``, the order alternating), and the medians are
compared as a ratio.

    .venv/bin/python benchmarks/stream_cost.py [--tokens 128] [--spacing 0.01] [--requests 8] \
        [--loops asyncio,uvloop] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

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


#: The event loops compared: asyncio's own and uvloop (the bridge's, deploykit/bridge/runner.py).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}

#: One figure: what it is, CPU ms (or µs) per unit, and how it was counted.
Figure = tuple[str, float, str]


async def measure(url: str, tokens: int, requests: int) -> list[Figure]:
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
        how = f"{events / requests:.0f} reads, {(time.perf_counter() - t0) / requests:.2f} s each"
        out.append((f"{label} (ms per request)", per, how))
    await engine.aclose()
    return out


async def wakeup_floor(reads: int = 400) -> Figure:
    """A bare read loop reading 200-byte messages 10 ms apart from another process."""
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
    return ("bare read loop (us per read)", 1000 * (cpu_ms() - start) / max(n, 1), f"{n} reads")


def run_on(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--spacing", type=float, default=0.01, help="seconds between tokens")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--loops", default="asyncio,uvloop", help=f"of {', '.join(LOOPS)}")
    p.add_argument("--rounds", type=int, default=1, help="turns of each loop, order alternating")
    args = p.parse_args()
    loops = args.loops.split(",")
    if unknown := set(loops) - set(LOOPS):
        p.error(f"unknown loop(s) {', '.join(sorted(unknown))}: choose from {', '.join(LOOPS)}")
    seen: dict[tuple[str, str], list[float]] = {}
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
        for turn in range(args.rounds):
            for loop in loops if turn % 2 == 0 else loops[::-1]:
                url = f"http://127.0.0.1:{port}"
                figures = run_on(loop, measure(url, args.tokens, args.requests))
                figures.append(run_on(loop, wakeup_floor()))
                for label, value, counted in figures:
                    seen.setdefault((loop, label), []).append(value)
                    print(f"round {turn + 1} {loop:8} {label:44} {value:7.2f} ({counted})")
    finally:
        server.terminate()
        server.wait(10)
    print(
        f"\n{args.tokens} tokens, {args.spacing * 1000:.0f} ms apart, CPU of the client "
        f"process, median of {args.rounds} round(s):"
    )
    labels = list(dict.fromkeys(label for _, label in seen))
    print(
        "| | " + " | ".join(loops) + (f" | {loops[1]}/{loops[0]}" if len(loops) == 2 else "") + " |"
    )
    print("|---" * (len(loops) + 1 + (len(loops) == 2)) + "|")
    for label in labels:
        medians = [statistics.median(seen[(loop, label)]) for loop in loops]
        cells = [f"{m:.2f}" for m in medians]
        if len(loops) == 2:
            cells.append(f"{medians[1] / medians[0]:.2f}" if medians[0] else "-")
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
