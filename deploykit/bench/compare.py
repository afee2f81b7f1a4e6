"""``deploykit compare``: a candidate engine's outputs and next-token distributions against a
baseline's, on the same prompts, greedy and one prompt at a time (vLLM is not batch-invariant: a
request's numbers depend on what it was batched with).

- Exact match and matching prefix: each engine's own greedy output, token by token.
- Quality: both engines are teacher-forced on the baseline's output (its prompt plus its answer
  sent as one prompt; vLLM's ``prompt_logprobs`` give each position's next-token log-probabilities),
  the way llama.cpp's perplexity tool compares a quantization with its base model. Per position:
  the KL divergence of the candidate from the baseline, KL(P_baseline || P_candidate), and whether
  both put the same token first.

The engines report their top K tokens per position (and the token actually there), not the whole
vocabulary. The KL is computed over the partition {each token both report} + {every other token,
as one}: by the log-sum inequality that is a lower bound of the true KL, exact when the reported
tokens hold all the probability, and 0 exactly when both engines report the same numbers.

Pure but :func:`score`, which runs the engine calls in the helper container
(deploykit/bench/helper.py) on the stack's engine network.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from deploykit import matrix
from deploykit.errors import CheckFailed, UsageError

#: Log-probabilities per position: at most vLLM's default ``--max-logprobs``, 20
#: (docs/facts.md, "The engine server").
TOP_K = 20


@dataclass(frozen=True)
class Scored:
    """One prompt on one engine."""

    index: int
    prompt_ids: list[int]
    output_ids: list[int]  # the engine's own greedy output
    text: str
    finish_reason: str
    forced_ids: list[int]  # what it was teacher-forced on (the baseline's output)
    logprobs: list[dict[int, float]]  # per forced position: token id -> log-probability (nats)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scored:
        return cls(
            index=int(data["index"]),
            prompt_ids=[int(t) for t in data["prompt_ids"]],
            output_ids=[int(t) for t in data["output_ids"]],
            text=str(data["text"]),
            finish_reason=str(data["finish_reason"]),
            forced_ids=[int(t) for t in data["forced_ids"]],
            logprobs=[{int(t): float(v) for t, v in row.items()} for row in data["logprobs"]],
        )


@dataclass(frozen=True)
class Side:
    """What ``--baseline``/``--candidate`` name: a method (a stack is started for it) or a
    running stack (``stack:NAME``)."""

    method: str | None = None
    stack: str | None = None

    def __str__(self) -> str:
        return f"stack:{self.stack}" if self.stack else str(self.method)


def parse_side(text: str, flag: str) -> Side:
    """``fp8`` (a method) or ``stack:NAME`` (a stack on this host, see ``deploykit ls``)."""
    value = text.strip()
    if value.startswith("stack:"):
        name = value[len("stack:") :]
        if not name:
            raise UsageError(
                f"{flag} {text!r} names no stack", "e.g. stack:my-stack (deploykit ls)"
            )
        return Side(stack=name)
    try:
        return Side(method=str(matrix.parse_quant(value)))
    except UsageError as err:
        raise UsageError(
            f"{flag} {text!r} is neither a method nor stack:NAME",
            f"a method starts a stack for it ({err.hint}); stack:NAME uses a running stack",
        ) from None


def kl_divergence(p: dict[int, float], q: dict[int, float]) -> float:
    """KL(P || Q) in nats over the tokens both report plus one bucket for the rest (a lower bound
    of the true KL; see the module's docstring). ``p``, ``q``: token id -> log-probability."""
    kl = p_known = q_known = 0.0
    for token in sorted(p.keys() & q.keys()):
        a = math.exp(p[token])
        kl += a * (p[token] - q[token])
        p_known += a
        q_known += math.exp(q[token])
    p_rest, q_rest = 1.0 - p_known, 1.0 - q_known
    if p_rest > 1e-12:
        kl += p_rest * math.log(p_rest / max(q_rest, 1e-12))
    return max(kl, 0.0)  # never below 0 but for rounding


def covered(p: dict[int, float], q: dict[int, float]) -> float:
    """The baseline's probability on the tokens both report: how much of the distribution the KL
    saw token by token (1.0: the KL is exact; near 0: the bound says little)."""
    return sum(math.exp(p[t]) for t in p.keys() & q.keys())


def top1(p: dict[int, float]) -> int:
    """The most likely token (the lowest id among equals, so ties decide alike everywhere)."""
    return min(p, key=lambda t: (-p[t], t))


def matching_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass
class Comparison:
    """What a candidate did against a baseline, prompt by prompt and position by position."""

    prompts: int = 0
    exact: int = 0
    prefix: list[int] = field(default_factory=list)  # matching prefix per prompt, in tokens
    baseline_tokens: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # per teacher-forced position
    covered: list[float] = field(default_factory=list)  # per position: see covered()
    top1_same: int = 0

    @property
    def positions(self) -> int:
        return len(self.kl)

    @property
    def exact_rate(self) -> float:
        return self.exact / self.prompts if self.prompts else 0.0

    @property
    def mean_prefix(self) -> float:
        return statistics.fmean(self.prefix) if self.prefix else 0.0

    @property
    def mean_prefix_share(self) -> float:
        """Matching prefix over the baseline's output length, averaged over prompts."""
        shares = [
            p / n if n else 1.0 for p, n in zip(self.prefix, self.baseline_tokens, strict=True)
        ]
        return statistics.fmean(shares) if shares else 0.0

    @property
    def mean_kl(self) -> float:
        return statistics.fmean(self.kl) if self.kl else 0.0

    def kl_quantile(self, q: float) -> float:
        if not self.kl:
            return 0.0
        data = sorted(self.kl)
        return data[min(len(data) - 1, math.ceil(q * len(data)) - 1)]

    @property
    def mean_covered(self) -> float:
        return statistics.fmean(self.covered) if self.covered else 0.0

    @property
    def top1_rate(self) -> float:
        return self.top1_same / self.positions if self.positions else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "positions": self.positions,
            "exact_rate": self.exact_rate,
            "mean_prefix_tokens": self.mean_prefix,
            "mean_prefix_share": self.mean_prefix_share,
            "mean_kl": self.mean_kl,
            "kl_p99": self.kl_quantile(0.99),
            "kl_max": max(self.kl) if self.kl else 0.0,
            "top1_agreement": self.top1_rate,
            "mean_covered": self.mean_covered,
        }


def compare(baseline: Sequence[Scored], candidate: Sequence[Scored]) -> Comparison:
    """The prompts both engines answered (matched by index)."""
    base = {s.index: s for s in baseline}
    out = Comparison()
    for cand in sorted(candidate, key=lambda s: s.index):
        b = base.get(cand.index)
        if b is None:
            continue
        if cand.prompt_ids != b.prompt_ids:
            raise CheckFailed(
                f"prompt {cand.index}: the candidate tokenizes the prompt differently from the "
                "baseline, so their distributions cannot be compared token by token",
                "compare models that share a tokenizer and chat template (a model and its "
                "quantizations)",
            )
        if cand.forced_ids != b.output_ids or len(b.logprobs) != len(b.output_ids):
            raise CheckFailed(
                f"prompt {cand.index}: the engines were not both scored on the baseline's output",
                "a bug in deploykit compare; please report it",
            )
        out.prompts += 1
        out.exact += cand.output_ids == b.output_ids
        out.prefix.append(matching_prefix(cand.output_ids, b.output_ids))
        out.baseline_tokens.append(len(b.output_ids))
        for p, q in zip(b.logprobs, cand.logprobs, strict=True):
            out.kl.append(kl_divergence(p, q))
            out.covered.append(covered(p, q))
            out.top1_same += top1(p) == top1(q)
    return out


def markdown(c: Comparison, baseline: str, candidate: str, settings: dict[str, Any]) -> str:
    """``compare.md``: the figures, and what they were measured on."""
    n = c.prompts
    interrupted = (
        " (interrupted: the prompts both engines answered)" if settings.get("interrupted") else ""
    )
    return "\n".join(
        [
            f"## deploykit compare: {candidate} against {baseline}",
            "",
            f"`{settings.get('command', '')}`",
            "",
            f"- {n} prompts{interrupted} from {settings.get('prompt_source')}, greedy "
            f"(temperature 0), sent one at a time, up to {settings.get('max_tokens')} output "
            "tokens each.",
            f"- Quality: both engines teacher-forced on the baseline's outputs ({c.positions} "
            f"positions), top {settings.get('top_k')} log-probabilities per position (vLLM's "
            "prompt_logprobs). The KL is a lower bound (the tokens both report, plus one bucket "
            "for the rest); exact when those tokens hold all the probability.",
            "",
            "| figure | value |",
            "|---|---|",
            f"| exact match | {c.exact}/{n} ({c.exact_rate * 100:.1f} %) |",
            f"| mean matching prefix | {c.mean_prefix:.1f} tokens "
            f"({c.mean_prefix_share * 100:.1f} % of the baseline's output) |",
            f"| mean KL divergence from the baseline | {c.mean_kl:.6f} nats/token |",
            f"| KL 99th percentile, max | {c.kl_quantile(0.99):.6f}, "
            f"{max(c.kl) if c.kl else 0.0:.6f} |",
            f"| top-1 agreement | {c.top1_same}/{c.positions} ({c.top1_rate * 100:.2f} %) |",
            f"| baseline probability on the tokens both report (1 = the KL is exact) | "
            f"{c.mean_covered:.3f} |",
            "",
        ]
    )


# --- the edge: the engine calls, through the helper ---------------------------------------


def score(
    engine: Any,
    prompts: Sequence[str],
    max_tokens: int,
    *,
    force: Sequence[list[int]] | None = None,
    top_k: int = TOP_K,
    on_scored: Callable[[Scored], None] | None = None,
) -> list[Scored]:
    """Each prompt on the stack's engine (deploykit.bench.engine), one at a time: its greedy output, and its log-
    probabilities teacher-forced on ``force`` (default: its own output). Ctrl-C passes through;
    what was scored until then went to ``on_scored``."""
    out: list[Scored] = []

    def on_line(item: dict[str, Any]) -> None:
        if "scored" in item:
            s = Scored.from_json(item["scored"])
            out.append(s)
            if on_scored is not None:
                on_scored(s)

    job = {
        "kind": "score",
        "model": engine.record.served_model_name,
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "top_k": top_k,
        "force": list(force) if force is not None else None,
    }
    engine.run_job(job, on_line)
    return out
