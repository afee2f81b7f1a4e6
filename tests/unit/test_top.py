"""deploykit top's pure core: parsing Prometheus text as the bridge writes it, windows, quantiles."""

from __future__ import annotations

import math

from deploykit import top
from deploykit.bridge.metrics import Metrics

ENGINE = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="demo"} 3.0
vllm:num_requests_waiting{engine="0",model_name="demo"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 0.25
vllm:generation_tokens_total{engine="0",model_name="demo"} %s
"""


def bridge_text(m: Metrics) -> str:
    return m.render(
        gauges={"sessions": 1},
        per_project={"queued": {"general": 2, "maze": 0}, "running": {"general": 1, "maze": 0}},
    )


def test_view_of_two_samples_gives_rates_and_the_window_p50() -> None:
    m = Metrics()
    first = top.Sample(100.0, top.parse_metrics(bridge_text(m)), top.parse_metrics(ENGINE % 10))
    for seconds in (0.2, 0.3, 0.4, 3.0):
        m.observe_latency(seconds, "general")
        m.requests[("general", "ok")] += 1
    m.requests[("maze", "error")] += 1
    m.observe_latency(0.01, "maze")
    m.count_tokens("general", 50, 40)
    last = top.Sample(110.0, top.parse_metrics(bridge_text(m)), top.parse_metrics(ENGINE % 60))
    v = top.view(first, last, ["general", "maze"])
    general, maze = v.projects
    assert v.window_s == 10.0
    assert general.requests_per_s == 0.4 and general.tokens_per_s == 4.0
    assert (general.in_flight, general.queued, general.errors) == (1, 2, 0)
    assert general.p50_s is not None and 0.25 <= general.p50_s <= 0.5
    assert maze.errors == 1 and maze.requests_per_s == 0.1 and maze.tokens_per_s == 0.0
    assert (v.engine.running, v.engine.waiting, v.engine.kv_cache_use) == (3, 1, 0.25)
    assert v.engine.tokens_per_s == 5.0


def test_one_sample_has_no_rates_and_missing_parts_show_as_unknown() -> None:
    only = top.Sample(5.0, None, None, problems=("bridge: not running",))
    v = top.view(only, only, ["general"])
    assert v.projects[0].requests_per_s is None and v.engine.running is None
    assert v.problems == ("bridge: not running",)


def test_quantile_interpolates_like_prometheus() -> None:
    assert top.quantile(0.5, {}) is None
    assert top.quantile(0.5, {1.0: 0, math.inf: 0}) is None
    assert top.quantile(0.5, {1.0: 2, 2.0: 4, math.inf: 4}) == 1.0
    assert top.quantile(0.75, {1.0: 2, 2.0: 4, math.inf: 4}) == 1.5
    assert top.quantile(0.5, {1.0: 0, math.inf: 4}) == 1.0  # all above the last bound


def test_parse_keeps_labels_and_skips_comments() -> None:
    parsed = top.parse_metrics('# TYPE x counter\nx{a="1",b="q\\"z"} 2\nx{a="2"} 3\ny 4.5\n')
    assert parsed["x"] == [({"a": "1", "b": 'q"z'}, 2.0), ({"a": "2"}, 3.0)]
    assert top.total(parsed, "x") == 5.0 and top.total(parsed, "x", a="2") == 3.0
    assert top.total(parsed, "y") == 4.5 and top.total(parsed, "missing") == 0
