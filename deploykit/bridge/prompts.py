"""From a request to what the engine gets: sampling parameters (pure) and the prompt, with the
session's history trimmed by tokens (counted with the engine's /tokenize)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deploykit.bridge.config import ProjectConfig
from deploykit.bridge.engine import EngineClient, TemplateOverhead
from deploykit.bridge.protocol import ChatRequest, ErrorCode, RequestFailed
from deploykit.bridge.sessions import PromptTooLong, Turn, trim_history


def sampling_params(request: ChatRequest, cfg: ProjectConfig) -> dict[str, Any]:
    """The engine's sampling fields. A value the client gave wins, also ``temperature: 0``
    (greedy); only a missing one falls back to the project default. ``engine_extra`` from the
    config comes first, so it cannot override what the client asked for."""
    max_tokens = request.maxTokens if request.maxTokens is not None else cfg.default_max_tokens
    temperature = (
        request.temperature if request.temperature is not None else cfg.default_temperature
    )
    top_p = request.topP if request.topP is not None else cfg.default_top_p
    params: dict[str, Any] = {**cfg.engine_extra}
    params.update(max_tokens=max_tokens, temperature=temperature, top_p=top_p)
    return params


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    params: dict[str, Any]
    kept_history: list[Turn]
    new_tokens: int  # tokens of the new user message


class PromptBuilder:
    """Counts tokens with the engine (system prompts cached) and trims history to fit."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.overhead = TemplateOverhead(base=0, per_message=0)
        self._cache: dict[str, int] = {}

    async def count(self, text: str, *, cache: bool = False) -> int:
        if cache and text in self._cache:
            return self._cache[text]
        n = await self.engine.count_tokens(text)
        if cache:
            if len(self._cache) > 1000:
                self._cache.clear()
            self._cache[text] = n
        return n

    async def build(
        self, history: list[Turn], request: ChatRequest, cfg: ProjectConfig, max_model_len: int
    ) -> Prompt:
        """Raises ``RequestFailed`` when maxTokens leaves no room or the message cannot fit."""
        params = sampling_params(request, cfg)
        max_tokens = int(params["max_tokens"])
        if max_tokens >= max_model_len:
            raise RequestFailed(
                ErrorCode.OUT_OF_RANGE,
                f"maxTokens {max_tokens} leaves no room for the prompt: the model's context "
                f"is {max_model_len} tokens",
            )
        system = request.systemPrompt if request.systemPrompt is not None else cfg.system_prompt
        new_tokens = await self.count(request.message)
        system_tokens = await self.count(system, cache=True) if system else None
        try:
            trimmed = trim_history(
                history,
                new_tokens=new_tokens,
                system_tokens=system_tokens,
                base_overhead=self.overhead.base,
                per_message_overhead=self.overhead.per_message,
                max_history_tokens=cfg.max_history_tokens,
                budget=max_model_len - max_tokens,
            )
        except PromptTooLong as err:
            raise RequestFailed(
                ErrorCode.MESSAGE_TOO_LONG,
                f"the message is too long for the model: {err} "
                f"(max_model_len {max_model_len} - maxTokens {max_tokens})",
            ) from err
        messages: list[dict[str, str]] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages += [{"role": t.role, "content": t.content} for t in trimmed.history]
        messages.append({"role": "user", "content": request.message})
        return Prompt(messages, params, trimmed.history, new_tokens)
