"""deploykit compare's figures: the KL divergence over the engines' top-K log-probabilities (a lower
bound of the true KL, 0 exactly for identical numbers), top-1 agreement, exact match and matching
prefix; what it refuses to compare; the sides it accepts."""

from __future__ import annotations

import math
import random

import pytest

from deploykit.bench import compare
from deploykit.errors import CheckFailed, UsageError


def logprobs(probs: dict[int, float]) -> dict[int, float]:
    return {t: math.log(p) for t, p in probs.items()}


def full_kl(p: dict[int, float], q: dict[int, float]) -> float:
    return sum(p[t] * math.log(p[t] / q[t]) for t in p if p[t] > 0)


def top_k(probs: dict[int, float], k: int, also: int | None = None) -> dict[int, float]:
    """What vLLM reports: the k most likely tokens, and the token actually there."""
    keep = sorted(probs, key=lambda t: -probs[t])[:k]
    if also is not None and also not in keep:
        keep.append(also)
    return {t: math.log(probs[t]) for t in keep}


def random_distribution(rng: random.Random, n: int, sharpness: float) -> dict[int, float]:
    weights = [math.exp(rng.gauss(0, sharpness)) for _ in range(n)]
    total = sum(weights)
    return {t: w / total for t, w in enumerate(weights)}


def test_identical_numbers_give_exactly_zero() -> None:
    p = top_k(random_distribution(random.Random(1), 512, 2.0), 20)
    assert compare.kl_divergence(p, dict(p)) == 0.0


def test_a_hand_computed_case() -> None:
    # both report tokens 1 and 2; the rest is one bucket on each side
    p = logprobs({1: 0.5, 2: 0.3, 4: 0.15})  # token 4 only in p: it joins p's rest, 0.2
    q = logprobs({1: 0.45, 2: 0.45, 3: 0.05})  # token 3 only in q: q's rest is 0.1
    want = 0.5 * math.log(0.5 / 0.45) + 0.3 * math.log(0.3 / 0.45) + 0.2 * math.log(0.2 / 0.1)
    assert compare.kl_divergence(p, q) == pytest.approx(want, abs=1e-12)
    assert compare.covered(p, q) == pytest.approx(0.8)


def test_with_the_whole_vocabulary_it_is_the_kl() -> None:
    rng = random.Random(7)
    p, q = random_distribution(rng, 64, 1.5), random_distribution(rng, 64, 1.5)
    got = compare.kl_divergence(logprobs(p), logprobs(q))
    assert got == pytest.approx(full_kl(p, q), rel=1e-9)


def test_from_the_top_k_it_is_a_lower_bound_that_tightens_with_k() -> None:
    rng = random.Random(3)
    for _ in range(50):
        p = random_distribution(rng, 512, 3.0)
        # a candidate close to p: each probability shaken a little, as a quantization does
        q_raw = {t: v * math.exp(rng.gauss(0, 0.2)) for t, v in p.items()}
        total = sum(q_raw.values())
        q = {t: v / total for t, v in q_raw.items()}
        true = full_kl(p, q)
        bounds = [compare.kl_divergence(top_k(p, k, 0), top_k(q, k, 0)) for k in (1, 5, 20, 512)]
        assert all(b <= true + 1e-12 for b in bounds)
        assert bounds[-1] == pytest.approx(true, rel=1e-9)
        assert bounds[2] >= bounds[0] - 1e-12


def test_top1_and_ties() -> None:
    assert compare.top1({5: -1.0, 3: -0.5, 9: -2.0}) == 3
    assert compare.top1({7: -0.7, 4: -0.7}) == 4
    assert compare.matching_prefix([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert compare.matching_prefix([1, 2], [1, 2, 3]) == 2
    assert compare.matching_prefix([], [1]) == 0


def scored(
    index: int,
    output: list[int],
    forced: list[int],
    rows: list[dict[int, float]],
    prompt: list[int] | None = None,
) -> compare.Scored:
    return compare.Scored(index, prompt or [1, 2, 3], output, "", "length", forced, rows)


def test_compare_counts_prompts_positions_and_agreement() -> None:
    a = logprobs({10: 0.6, 11: 0.3})
    b = logprobs({10: 0.3, 11: 0.6})
    base = [
        scored(0, [10, 10], [10, 10], [a, a]),
        scored(1, [10, 11, 10], [10, 11, 10], [a, a, a]),
    ]
    cand = [
        scored(0, [10, 10], [10, 10], [a, a]),  # same output, same numbers
        scored(1, [10, 10, 10], [10, 11, 10], [a, b, a]),  # differs at its second token
    ]
    c = compare.compare(base, cand)
    assert (c.prompts, c.exact, c.prefix, c.baseline_tokens) == (2, 1, [2, 1], [2, 3])
    assert c.positions == 5 and c.top1_same == 4
    assert c.mean_prefix == 1.5 and c.mean_prefix_share == pytest.approx((1.0 + 1 / 3) / 2)
    kl_b = compare.kl_divergence(a, b)
    assert kl_b > 0 and c.kl == [0.0, 0.0, 0.0, kl_b, 0.0]
    assert c.mean_kl == pytest.approx(kl_b / 5)
    assert c.covered == pytest.approx([0.9] * 5) and c.mean_covered == pytest.approx(0.9)
    assert c.kl_quantile(0.99) == kl_b
    data = c.to_json()
    assert data["exact_rate"] == 0.5 and data["top1_agreement"] == 0.8
    text = compare.markdown(c, "base", "cand", {"top_k": 20, "max_tokens": 3})
    assert "| exact match | 1/2 (50.0 %) |" in text
    assert "| top-1 agreement | 4/5 (80.00 %) |" in text


def test_only_prompts_both_answered_count() -> None:
    a = logprobs({10: 0.6})
    base = [scored(i, [10], [10], [a]) for i in range(3)]
    c = compare.compare(base, base[:2])  # the candidate was interrupted after two
    assert c.prompts == 2 and c.exact == 2 and c.mean_kl == 0.0


def test_different_tokenizers_are_refused() -> None:
    a = logprobs({10: 0.6})
    with pytest.raises(CheckFailed, match="tokenizes the prompt differently"):
        compare.compare([scored(0, [10], [10], [a])], [scored(0, [10], [10], [a], [1, 2, 4])])
    with pytest.raises(CheckFailed, match="not both scored on the baseline's output"):
        compare.compare([scored(0, [10], [10], [a])], [scored(0, [10], [11], [a])])


def test_sides() -> None:
    assert compare.parse_side("FP8", "--candidate") == compare.Side(method="fp8")
    assert compare.parse_side("stack:my-stack", "--baseline") == compare.Side(stack="my-stack")
    assert str(compare.Side(stack="s")) == "stack:s"
    with pytest.raises(UsageError, match="neither a method nor stack:NAME") as err:
        compare.parse_side("int3", "--candidate")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="names no stack"):
        compare.parse_side("stack:", "--baseline")
