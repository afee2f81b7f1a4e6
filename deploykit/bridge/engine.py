"""Async client for the engine's OpenAI-compatible HTTP API (vLLM's OpenAI server).

Endpoints used (vLLM ``vllm/entrypoints/openai/api_server.py``): ``GET /v1/models`` (served model
name and ``max_model_len``), ``POST /tokenize`` (token counts with the served model's tokenizer,
``vllm/entrypoints/serve/tokenize``), ``POST /v1/chat/completions`` (plain or streamed), ``GET
/health``. Reasoning text comes back in ``reasoning``/``reasoning_content`` when vLLM runs a
reasoning parser; only ``content`` is ever used as the answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx


class EngineError(Exception):
    """The engine answered with an error (``status`` set) or could not be reached (``status`` None)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status

    @property
    def unavailable(self) -> bool:
        return self.status is None or self.status >= 500


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


class EngineClient:
    def __init__(
        self, base_url: str, *, max_connections: int = 256, timeout_s: float = 300.0
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
        )
        self.model: ModelInfo | None = None

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post(path, json=body)
        except httpx.HTTPError as err:
            raise EngineError(f"engine unreachable: {type(err).__name__}: {err}") from err
        if response.status_code != 200:
            raise EngineError(_error_text(response), response.status_code)
        data: dict[str, Any] = response.json()
        return data

    async def health(self) -> bool:
        try:
            response = await self._http.get("/health", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def discover(self) -> ModelInfo:
        """The served model (first entry of /v1/models) and its context length."""
        try:
            response = await self._http.get("/v1/models", timeout=10.0)
        except httpx.HTTPError as err:
            raise EngineError(f"engine unreachable: {type(err).__name__}: {err}") from err
        if response.status_code != 200:
            raise EngineError(_error_text(response), response.status_code)
        models = response.json().get("data") or []
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
        data = await self._post(
            "/tokenize", {"model": self.model_name, "prompt": text, "add_special_tokens": False}
        )
        return int(data["count"])

    async def count_chat_tokens(self, messages: list[dict[str, str]]) -> int:
        data = await self._post(
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
        data = await self._post("/v1/chat/completions", self._body(messages, params))
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
        self, messages: list[dict[str, str]], params: dict[str, Any]
    ) -> AsyncIterator[str | Completion]:
        """Yield text deltas, then one final ``Completion`` with the whole text and usage."""
        body = self._body(messages, params)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        parts: list[str] = []
        usage: dict[str, Any] = {}
        finish: str | None = None
        reasoned = False
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise EngineError(_error_text(response), response.status_code)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise EngineError(str(chunk["error"].get("message", chunk["error"])), 500)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        fields = choice.get("delta") or {}
                        if fields.get("reasoning") or fields.get("reasoning_content"):
                            reasoned = True  # reasoning deltas are never streamed to clients
                        delta = fields.get("content")
                        if delta:
                            parts.append(delta)
                            yield delta
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
        except httpx.HTTPError as err:
            raise EngineError(f"engine unreachable: {type(err).__name__}: {err}") from err
        yield Completion(
            text="".join(parts),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=finish,
            reasoned=reasoned,
        )


def _error_text(response: httpx.Response) -> str:
    try:
        data = response.json()
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return f"engine returned {response.status_code}: {err['message']}"
        if isinstance(data, dict) and data.get("message"):
            return f"engine returned {response.status_code}: {data['message']}"
    except ValueError:
        pass
    return f"engine returned {response.status_code}: {response.text[:200]}"
