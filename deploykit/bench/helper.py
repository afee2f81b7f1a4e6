"""What runs inside the helper container on a stack's engine network: ``python -m
deploykit.bench.helper JOB.json``. The engine's OpenAI port is never published, so the direct path
of ``deploykit bench`` and the engine calls of ``deploykit compare`` run here, in a container of the
stack's own bridge image (deploykit/bench/enginenet.py starts it).

Needs only what the bridge image has (the load generator: aiohttp, orjson). The engine's API key
is read from the file named by ``DEPLOYKIT_ENGINE_API_KEY_FILE`` (a read-only mount of the stack's
secret), never from an argument. Output: one JSON object per line on stdout, flushed at once, so
the caller shows progress and keeps what was measured when it is interrupted:

- ``load`` jobs (loadgen.DirectLoad): ``{"warmup": n}`` (when asked), ``{"started": {}}``, then
  ``{"sample": {...}}`` per request, then ``{"done": {"seconds": s}}``;
- ``score`` jobs (compare, one prompt at a time, greedy): ``{"scored": {...}}`` per prompt (the
  prompt's token ids, the greedy output's token ids and text, and the next-token log-probabilities
  at each position of the forced output), then ``{"done": {}}``;
- a job that cannot run: ``{"fatal": "message"}`` and exit status 1.
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from deploykit import loadgen

API_KEY_ENV = "DEPLOYKIT_ENGINE_API_KEY_FILE"


def emit(kind: str, value: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps({kind: value}) + b"\n")
    sys.stdout.flush()


def api_key() -> str | None:
    path = os.environ.get(API_KEY_ENV)
    if not path or not Path(path).is_file():
        return None
    return Path(path).read_text().strip() or None


async def load_job(job: dict[str, Any]) -> None:
    direct = loadgen.DirectLoad(
        job["engine"],
        job["model"],
        api_key=api_key(),
        extra=job.get("extra") or {},
        system_prompt=job.get("system_prompt"),
        timeout_s=float(job.get("timeout_s", 600)),
    )
    prompts = tuple(job["prompts"])
    stream = bool(job.get("stream", True))
    if job.get("warmup"):
        warm = int(job["warmup"])
        await direct.run(min(warm, 4), warm, job["max_tokens"], stream=stream, prompts=prompts)
        emit("warmup", warm)
    emit("started", {})
    run = await direct.run(
        int(job["concurrency"]),
        int(job["requests"]),
        int(job["max_tokens"]),
        stream=stream,
        prompts=prompts,
        on_sample=lambda s: emit("sample", asdict(s)),
    )
    emit("done", {"seconds": run.seconds})


class Engine:
    """The few engine calls of compare, one at a time."""

    def __init__(self, http: aiohttp.ClientSession, url: str, model: str) -> None:
        self.http = http
        self.url = url.rstrip("/")
        self.model = model

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with self.http.post(self.url + path, data=orjson.dumps(body)) as resp:
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"POST {path}: HTTP {resp.status}: {data[:300]!r}")
            result: dict[str, Any] = orjson.loads(data)
            return result

    async def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The chat template applied to the messages, as token ids (as the chat API sends them)."""
        data = await self.post(
            "/tokenize", {"model": self.model, "messages": messages, "add_generation_prompt": True}
        )
        return [int(t) for t in data["tokens"]]

    async def greedy(self, prompt: list[int], max_tokens: int) -> tuple[list[int], str, str]:
        data = await self.post(
            "/v1/completions",
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "return_token_ids": True,
            },
        )
        choice = data["choices"][0]
        return [int(t) for t in choice["token_ids"]], choice["text"], str(choice["finish_reason"])

    async def forced(
        self, prompt: list[int], output: list[int], top_k: int
    ) -> list[dict[str, float]]:
        """Teacher-forced: the engine's log-probabilities of the next token at each position of
        ``output`` after ``prompt`` (vLLM's ``prompt_logprobs``: the top ``top_k`` tokens and the
        token that is actually there), keyed by token id."""
        if not output:
            return []
        data = await self.post(
            "/v1/completions",
            {
                "model": self.model,
                "prompt": prompt + output,
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": top_k,
            },
        )
        rows = data["choices"][0]["prompt_logprobs"][len(prompt) :]
        return [{str(tok): float(v["logprob"]) for tok, v in (row or {}).items()} for row in rows]


async def score_job(job: dict[str, Any]) -> None:
    key = api_key()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    timeout = aiohttp.ClientTimeout(total=float(job.get("timeout_s", 600)))
    force: list[list[int] | None] = job.get("force") or [None] * len(job["prompts"])
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
        engine = Engine(http, job["engine"], job["model"])
        for i, prompt in enumerate(job["prompts"]):
            messages = [{"role": "user", "content": prompt}]
            if job.get("system_prompt"):
                messages.insert(0, {"role": "system", "content": job["system_prompt"]})
            ids = await engine.prompt_ids(messages)
            output, text, finish = await engine.greedy(ids, int(job["max_tokens"]))
            given = force[i]
            forced = given if given is not None else output
            emit(
                "scored",
                {
                    "index": i,
                    "prompt_ids": ids,
                    "output_ids": output,
                    "text": text,
                    "finish_reason": finish,
                    "forced_ids": forced,
                    "logprobs": await engine.forced(ids, forced, int(job["top_k"])),
                },
            )
    emit("done", {})


def main(argv: list[str]) -> int:
    try:
        job = orjson.loads(Path(argv[0]).read_bytes())
        run = {"load": load_job, "score": score_job}[job["kind"]]
        asyncio.run(run(job))
    except Exception as err:  # the caller reports it; nothing else reads this stream
        emit("fatal", f"{type(err).__name__}: {err}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
