"""Async client for the engine's OpenAI-compatible HTTP API (vLLM's OpenAI server), on aiohttp.

Endpoints used (vLLM ``vllm/entrypoints/openai/api_server.py``): ``GET /v1/models`` (served model
name and ``max_model_len``), ``POST /tokenize`` (token counts with the served model's tokenizer,
``vllm/entrypoints/serve/tokenize``), ``POST /v1/chat/completions`` (plain or streamed), ``GET
/health``. Reasoning text comes back in ``reasoning``/``reasoning_content`` when vLLM runs a
reasoning parser; only ``content`` is ever used as the answer.

Why aiohttp and orjson: this is the bridge's hot path. httpx's pool walked every pooled connection
on each request event (``_assign_requests_to_connections``), which made the bridge's CPU per request
grow with concurrency; aiohttp's connector does not. orjson parses each streamed chunk several
times faster than the standard library (benchmarks/RESULTS.md has both measurements).

Connections and retries:
- Idle connections are closed after ``keepalive_s``, below the engine's own keep-alive (vLLM serves
  through uvicorn with ``--timeout-keep-alive`` 5 s by default, ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so
  the bridge never reuses a connection the engine is about to close.
- A call that fails before the engine produced anything (connection refused or reset, the server
  closing a kept-alive connection) is retried ``retries`` times with exponential backoff; a stream
  that already gave text is never retried (its text has been published).
- A stream is read to the end of its body (the chunk after ``[DONE]``): aiohttp returns only a
  connection whose response was read to the end to its pool and closes any other, so a stream left
  there made every streamed request open a new connection to the engine. ``connections`` counts the
  connections opened (a metric: it should stay near the number of requests at once, not grow with
  the requests).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

_JSON = {"Content-Type": "application/json"}


class EngineError(Exception):
    """The engine answered with an error (``status`` set) or could not be reached (``status`` None).
    ``overloaded``: the engine is up but dropped the call (resets under load)."""

    def __init__(
        self, message: str, status: int | None = None, *, overloaded: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.overloaded = overloaded

    @property
    def unavailable(self) -> bool:
        return not self.overloaded and (self.status is None or self.status >= 500)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    #: The engine's reasoning parser split off reasoning text (never sent, never kept).
    reasoned: bool = False


@dataclass(frozen=True)
class TemplateOverhead:
    """Tokens the chat template adds: ``base`` once per prompt (BOS, generation prompt) and
    ``per_message`` around each message. Measured once against the engine."""

    base: int
    per_message: int


#: Failures of the connection itself, before any answer: safe to retry. A read timeout is not one
#: of them (the engine is busy with the call; see ``_backoff``).
_RETRYABLE = (
    aiohttp.ClientConnectionError,  # refused, reset, server disconnected, connect timeout
    aiohttp.ClientPayloadError,
)


class EngineClient:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        max_connections: int = 256,
        timeout_s: float = 300.0,
        keepalive_s: float = 4.0,
        retries: int = 3,
        retry_backoff_s: float = 0.1,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model: ModelInfo | None = None
        self.retries = retries
        self.retry_backoff_s = retry_backoff_s
        self.retried = 0  # calls retried after a connection failure (a metric)
        self.connections = 0  # connections to the engine opened (a metric)
        self._max_connections = max_connections
        self._timeout_s = timeout_s
        self._keepalive_s = keepalive_s
        self._headers = dict(_JSON)
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._http: aiohttp.ClientSession | None = None

    @property
    def http(self) -> aiohttp.ClientSession:
        """The session, made on first use (aiohttp needs a running loop)."""
        if self._http is None:
            opened = aiohttp.TraceConfig()
            opened.on_connection_create_end.append(self._opened)
            self._http = aiohttp.ClientSession(
                trace_configs=[opened],
                base_url=self.base_url,
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    keepalive_timeout=self._keepalive_s,
                    ttl_dns_cache=60,
                ),
                timeout=aiohttp.ClientTimeout(
                    total=None, sock_connect=10.0, sock_read=self._timeout_s
                ),
                headers=self._headers,
                auto_decompress=False,
                raise_for_status=False,
            )
        return self._http

    async def _opened(self, *_: object) -> None:
        self.connections += 1

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ plumbing
    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One JSON call with retries on connection failures; returns the parsed answer."""
        data = orjson.dumps(body) if body is not None else None
        attempt = 0
        while True:
            try:
                async with self.http.request(method, path, data=data) as response:
                    raw = await response.read()
                    if response.status != 200:
                        raise EngineError(_error_text(response.status, raw), response.status)
                    try:
                        return orjson.loads(raw)
                    except orjson.JSONDecodeError as err:
                        raise EngineError(
                            f"the engine's answer is not JSON: {raw[:200]!r}", 502
                        ) from err
            except _RETRYABLE as err:
                attempt = await self._backoff(attempt, err)

    async def _backoff(self, attempt: int, err: BaseException) -> int:
        """Sleep before the next attempt, or raise the final EngineError."""
        if isinstance(err, aiohttp.SocketTimeoutError):
            raise EngineError(
                f"no answer from the engine within {self._timeout_s:g} s", 504
            ) from err
        if attempt >= self.retries:
            overloaded = await self.health()
            what = "dropped the connection" if overloaded else "is unreachable"
            raise EngineError(
                f"the engine {what} ({type(err).__name__}: {err}) after {attempt + 1} attempts",
                None,
                overloaded=overloaded,
            ) from err
        self.retried += 1
        await asyncio.sleep(self.retry_backoff_s * (4**attempt))
        return attempt + 1

    # ------------------------------------------------------------------ endpoints
    async def health(self) -> bool:
        try:
            async with self.http.get("/health", timeout=aiohttp.ClientTimeout(total=5.0)) as r:
                await r.read()
                return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def discover(self) -> ModelInfo:
        """The served model (first entry of /v1/models) and its context length."""
        data = await self._call("GET", "/v1/models")
        models = data.get("data") if isinstance(data, dict) else None
        if not models:
            raise EngineError("the engine serves no model", 503)
        first = models[0]
        self.model = ModelInfo(str(first["id"]), int(first.get("max_model_len") or 2048))
        return self.model

    @property
    def model_name(self) -> str:
        if self.model is None:
            raise EngineError("the engine's model is not known yet")
        return self.model.name

    async def count_tokens(self, text: str) -> int:
        data = await self._call(
            "POST",
            "/tokenize",
            {"model": self.model_name, "prompt": text, "add_special_tokens": False},
        )
        return int(data["count"])

    async def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        data = await self._call(
            "POST",
            "/tokenize",
            {"model": self.model_name, "messages": messages, "add_generation_prompt": True},
        )
        return int(data["count"])

    async def template_overhead(self) -> TemplateOverhead:
        """Measure what the chat template adds, so history can be counted per message."""
        text = "hello"
        content = await self.count_tokens(text)
        one = await self.count_chat_tokens([{"role": "user", "content": text}])
        two = await self.count_chat_tokens(
            [
                {"role": "user", "content": text},
                {"role": "assistant", "content": text},
                {"role": "user", "content": text},
            ]
        )
        per_message = max(0, (two - one) // 2 - content)
        base = max(0, one - content - per_message)
        return TemplateOverhead(base=base, per_message=per_message)

    def _body(self, messages: list[dict[str, str]], params: dict[str, Any]) -> dict[str, Any]:
        return {"model": self.model_name, "messages": messages, **params}

    async def chat(self, messages: list[dict[str, str]], params: dict[str, Any]) -> Completion:
        data = await self._call("POST", "/v1/chat/completions", self._body(messages, params))
        try:
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            reasoned = bool(message.get("reasoning") or message.get("reasoning_content"))
        except (KeyError, IndexError, TypeError) as err:
            raise EngineError(f"unexpected engine answer: {str(data)[:200]}", 502) from err
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
            reasoned=reasoned,
        )

    async def chat_stream(
        self, messages: list[dict[str, str]], params: dict[str, Any], *, tokens_per_event: int = 1
    ) -> AsyncIterator[str | Completion]:
        """Yield text deltas, then one final ``Completion`` with the whole text and usage.

        Server-sent events arrive as ``data: {json}`` blocks separated by a blank line; the
        connection's bytes are split into events directly, and each read yields one delta (all the
        text it brought). Every event costs the bridge a wake-up, its main cost when streaming, so
        ``tokens_per_event`` > 1 asks vLLM to batch that many tokens into each event after the
        first (the request's ``stream_interval``, vllm/sampling_params.py: the first and the final
        output are always sent at once; an engine that does not know the field ignores it).
        """
        body = self._body(messages, params)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        if tokens_per_event > 1:
            body["stream_interval"] = tokens_per_event
        data = orjson.dumps(body)
        stream = _SseState()
        attempt = 0
        while True:
            try:
                async with self.http.post("/v1/chat/completions", data=data) as response:
                    if response.status != 200:
                        raise EngineError(
                            _error_text(response.status, await response.read()), response.status
                        )
                    while not stream.done:
                        chunk = await response.content.readany()
                        if not chunk:
                            break
                        delta = stream.feed(chunk)
                        if delta:
                            yield delta
                    await _read_to_the_end(response)
                break
            except _RETRYABLE as err:
                if stream.parts:  # text already went out: the stream cannot start again
                    raise EngineError(
                        f"the engine's stream broke off ({type(err).__name__}: {err})", None
                    ) from err
                attempt = await self._backoff(attempt, err)
        yield stream.completion()


#: How long to wait for the end of a stream's body after ``[DONE]`` (the server sends it at once).
_END_WAIT_S = 1.0


async def _read_to_the_end(response: aiohttp.ClientResponse) -> None:
    """Read what follows ``[DONE]`` (the body's last chunk), so the connection goes back to the
    pool; a body that does not end within a second leaves its connection to be closed."""
    content = response.content
    try:
        async with asyncio.timeout(_END_WAIT_S):
            while not content.at_eof() and await content.readany():
                pass
    except TimeoutError:
        pass


class _SseState:
    """What a chat completion stream gave so far (pure: bytes in, text out)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.parts: list[str] = []
        self.usage: dict[str, Any] = {}
        self.finish: str | None = None
        self.reasoned = False
        self.done = False

    def feed(self, chunk: bytes) -> str:
        """Take the next bytes; return the text they completed (may be empty)."""
        self.buffer += chunk
        *events, self.buffer = self.buffer.split(b"\n\n")
        text: list[str] = []
        for event in events:
            if not event.startswith(b"data:"):
                continue
            payload = event[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                break
            item = orjson.loads(payload)
            if item.get("error"):
                err = item["error"]
                raise EngineError(str(err.get("message", err)), 500)
            if item.get("usage"):
                self.usage = item["usage"]
            for choice in item.get("choices") or ():
                fields = choice.get("delta") or {}
                if fields.get("reasoning") or fields.get("reasoning_content"):
                    self.reasoned = True  # reasoning deltas are never streamed
                delta = fields.get("content")
                if delta:
                    text.append(delta)
                if choice.get("finish_reason"):
                    self.finish = choice["finish_reason"]
        joined = "".join(text)
        if joined:
            self.parts.append(joined)
        return joined

    def completion(self) -> Completion:
        return Completion(
            text="".join(self.parts),
            prompt_tokens=int(self.usage.get("prompt_tokens") or 0),
            completion_tokens=int(self.usage.get("completion_tokens") or 0),
            finish_reason=self.finish,
            reasoned=self.reasoned,
        )


def _error_text(status: int, raw: bytes) -> str:
    try:
        data = orjson.loads(raw)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return f"engine returned {status}: {err['message']}"
        if isinstance(data, dict) and data.get("message"):
            return f"engine returned {status}: {data['message']}"
    except orjson.JSONDecodeError:
        pass
    return f"engine returned {status}: {raw[:200].decode('utf-8', 'replace')}"
