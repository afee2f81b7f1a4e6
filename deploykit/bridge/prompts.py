"""From a request to what the engine gets: sampling parameters (pure) and the prompt, with the
session's history trimmed by tokens, without asking the engine to count them in the common case.

Token counts:
- a history turn's count is exact: an answer's is the engine's ``completion_tokens``; a user
  message's is derived from the engine's ``prompt_tokens`` for the request that carried it, minus
  what the rest of that prompt is known to hold (``user_tokens_from_usage``);
- a new message's count is bounded from above by its UTF-8 length plus one: every token of a
  byte-level BPE tokenizer covers at least one byte, SentencePiece adds at most one word-boundary
  token in front. When that bound cannot change what is kept (the history is trimmed by
  ``max_history_tokens`` alone and everything fits the model's context), the engine is not asked;
  otherwise ``/tokenize`` gives the exact count before trimming, as before. The engine still
  checks the final prompt itself: its context-length refusal becomes ``message_too_long``.
- a system prompt is counted once with ``/tokenize`` and remembered.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from deploykit.bridge.config import ProjectConfig
from deploykit.bridge.engine import EngineClient, TemplateOverhead
from deploykit.bridge.protocol import ChatRequest, ErrorCode, RequestFailed
from deploykit.bridge.sessions import PromptTooLong, Turn, trim_history

SYSTEM_COUNT_CACHE = 1024


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


def token_bound(text: str) -> int:
    """An upper bound of ``text``'s token count with any BPE or SentencePiece tokenizer."""
    return len(text.encode("utf-8")) + 1


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, str]]
    params: dict[str, Any]
    kept_history: list[Turn]
    system_tokens: int | None
    new_tokens: int  # the new message's tokens: exact when ``exact``, else the upper bound
    exact: bool


class PromptBuilder:
    """Builds prompts within the context budget; asks the engine to count only when needed."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.overhead = TemplateOverhead(base=0, per_message=0)
        self._system: OrderedDict[str, int] = OrderedDict()
        self.counted = 0  # /tokenize calls for new messages (a metric)

    async def system_tokens(self, text: str) -> int:
        n = self._system.get(text)
        if n is None:
            n = await self.engine.count_tokens(text)
            self._system[text] = n
            if len(self._system) > SYSTEM_COUNT_CACHE:
                self._system.popitem(last=False)
        else:
            self._system.move_to_end(text)
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
        system_tokens = await self.system_tokens(system) if system else None
        budget = max_model_len - max_tokens
        pm = self.overhead.per_message
        new_tokens, exact = token_bound(request.message), False
        fixed = self.overhead.base + new_tokens + pm
        if system_tokens is not None:
            fixed += system_tokens + pm
        history_cost = sum(t.tokens + pm for t in history)
        if fixed + min(history_cost, cfg.max_history_tokens) > budget:
            # the bound could cut history or refuse the message: count exactly
            new_tokens, exact = await self.engine.count_tokens(request.message), True
            self.counted += 1
        try:
            trimmed = trim_history(
                history,
                new_tokens=new_tokens,
                system_tokens=system_tokens,
                base_overhead=self.overhead.base,
                per_message_overhead=pm,
                max_history_tokens=cfg.max_history_tokens,
                budget=budget,
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
        return Prompt(messages, params, trimmed.history, system_tokens, new_tokens, exact)

    def user_tokens_from_usage(self, prompt: Prompt, prompt_tokens: int) -> int:
        """The new message's exact token count, from the engine's count of the whole prompt. Falls
        back to what ``build`` knew when the engine's count does not fit the template model."""
        if prompt.exact or prompt_tokens <= 0:
            return prompt.new_tokens
        pm = self.overhead.per_message
        known = self.overhead.base + pm + sum(t.tokens + pm for t in prompt.kept_history)
        if prompt.system_tokens is not None:
            known += prompt.system_tokens + pm
        derived = prompt_tokens - known
        return derived if 0 < derived <= prompt.new_tokens else prompt.new_tokens
