"""deploykit bench's pure parts: which limits would shape a load, prompts, the figures drawn from
runs (ratios, gains, targets), results.json both ways, results.md, results.png, the engine's
memory from recorded vLLM logs, peak GPU memory from recorded NVML inventories."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from deploykit import devices
from deploykit.bench import enginelog, gpumemory, limits, plot, prompts, report
from deploykit.bench.results import BenchResult, Overhead, RunRecord
from deploykit.bridge.config import BridgeConfig, load_config
from deploykit.errors import UsageError
from deploykit.loadgen import Sample

DATA = Path(__file__).resolve().parent.parent / "data"
LOGS = DATA / "vllm-logs"


def settings_of(config: BridgeConfig, project: str) -> limits.ProjectSettings:
    return limits.ProjectSettings.from_config(
        project,
        {
            "project": config.project(project).model_dump(mode="json"),
            "bridge": config.bridge.model_dump(mode="json"),
        },
    )


# --- limits --------------------------------------------------------------------------------------


def test_the_default_project_is_refused_for_its_rate_limit() -> None:
    s = settings_of(BridgeConfig(), "general")
    assert limits.problems(s, 64, 128) == ["a rate limit of 1200 requests a minute, bursts of 200"]
    # the defaults' other bounds bind only above them
    assert "max_queued 256 < concurrency 300" in limits.problems(s, 300, 128)
    assert "the bridge's max_in_flight 256 < concurrency 300" in limits.problems(s, 300, 128)
    assert "max_max_tokens 1024 < --max-tokens 2048" in limits.problems(s, 1, 2048)


def test_the_bench_config_loads_in_the_bridge_and_nothing_shapes_the_load(tmp_path: Path) -> None:
    existing = {"defaults": {"default_max_tokens": 16}, "projects": {"maze": {"max_queued": 3}}}
    path = tmp_path / "bench.yaml"
    path.write_text(limits.bench_config(existing))
    config = load_config(path)  # the bridge's own loader accepts it
    bench = settings_of(config, "bench")
    assert limits.problems(bench, 256, 4096) == []
    assert bench.fixed_length and bench.rate_limit_per_minute is None
    assert limits.problems(bench, 257, 128) == ["the bridge's max_in_flight 256 < concurrency 257"]
    # the stack's own settings stay as they were
    assert config.project("maze").max_queued == 3
    assert config.project("maze").default_max_tokens == 16
    assert "rate limit off" in limits.statement(bench, 64)
    assert "all >= concurrency 64" in limits.statement(bench, 64)


@pytest.mark.parametrize(
    ("override", "problem"),
    [
        ({"max_engine_slots": 8}, "max_engine_slots 8 < concurrency 64"),
        ({"receive_maximum": 32}, "receive_maximum 32 < concurrency 64"),
        ({"rate_limit_per_minute": 100000, "rate_limit_burst": None}, "a rate limit of 100000"),
    ],
)
def test_each_bound_that_binds_is_named(override: dict[str, object], problem: str) -> None:
    config = BridgeConfig(projects={"bench": {**limits.BENCH_PROJECT_CONFIG, **override}})
    found = limits.problems(settings_of(config, "bench"), 64, 128)
    assert len(found) == 1 and found[0].startswith(problem)


def test_the_refusal_hint_names_the_commands() -> None:
    hint = limits.refusal_hint("s1", ("general",))
    assert "deploykit bench --name s1 --print-config > bench.yaml" in hint
    assert "deploykit up --name s1 --projects general,bench --bridge-config bench.yaml" in hint


# --- prompts -------------------------------------------------------------------------------------


def test_the_default_prompts_ship_and_files_parse(tmp_path: Path) -> None:
    default, source = prompts.load(None)
    assert len(default) >= 10 and source == "the kit's default prompts"
    assert all(p.strip() and not p.startswith("#") for p in default)
    text = tmp_path / "p.txt"
    text.write_text("# a comment\n\nfirst\n  second  \n")
    assert prompts.load(text) == (("first", "second"), str(text))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('"one"\n{"prompt": "two # not a comment"}\n')
    assert prompts.load(jsonl)[0] == ("one", "two # not a comment")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.txt", "# only a comment\n", "holds no prompt"),
        ("bad.jsonl", "{not json\n", "line 1 is not JSON"),
        ("none.jsonl", '{"other": 1}\n', "line 1 holds no prompt"),
    ],
)
def test_bad_prompt_files_are_usage_errors(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as err:
        prompts.load(path)
    assert err.value.exit_code == 2 and err.value.hint
    with pytest.raises(UsageError, match="cannot read"):
        prompts.load(tmp_path / "missing.txt")


# --- results -------------------------------------------------------------------------------------


def samples(n: int, latency: float, ttft: float, tokens: int = 128) -> list[Sample]:
    return [Sample(latency + i * 0.001, ttft, tokens) for i in range(n)]


def result_with(
    runs: list[RunRecord], overhead: Overhead | None = None, **kwargs: object
) -> BenchResult:
    return BenchResult(
        stack={
            "name": "s",
            "quant": "none",
            "gpu_class": "cpu",
            "model": "bench",
            "vllm": "0.32.0",
        },
        project="bench",
        limits="project 'bench': rate limit off",
        settings={
            "concurrency": sorted({r.concurrency for r in runs}),
            "requests": {str(r.concurrency): r.planned for r in runs},
            "max_tokens": 128,
            "fixed_length": True,
            "prompts": 16,
            "prompt_source": "the kit's default prompts",
        },
        runs=runs,
        overhead=overhead,
        command="deploykit bench --name s",
        host={"cpus": 2, "load_average_before": [0.5, 0.4, 0.3]},
        **kwargs,  # type: ignore[arg-type]
    )


def two_paths() -> BenchResult:
    # c=1: 8 requests, 1 s each, sequential: 8 s. c=64: 64 requests at once, 10 s.
    return result_with(
        [
            RunRecord("mqtt", 1, 8, 8.0, samples(8, 1.0, 0.10)),
            RunRecord("direct", 1, 8, 8.0, samples(8, 0.998, 0.09)),
            RunRecord("mqtt", 64, 64, 10.4, samples(64, 10.0, 1.0)),
            RunRecord("direct", 64, 64, 10.0, samples(64, 9.9, 0.9)),
        ],
        Overhead([0.0902, 0.0910, 0.0905], [0.0880, 0.0885, 0.0881]),
    )


def test_ratios_gain_and_targets_follow_from_the_runs() -> None:
    r = two_paths()
    by_c = {x.concurrency: x for x in r.ratios()}
    assert by_c[1].tps == pytest.approx(1.0)
    assert by_c[64].tps == pytest.approx(10.0 / 10.4)
    assert by_c[64].p50_added_s == pytest.approx(0.1)
    assert by_c[1].ttft_p50_added_s == pytest.approx(0.01)
    gain = r.gain()
    assert gain is not None and (gain.low, gain.high) == (1, 64)
    assert gain.mqtt == pytest.approx((64 * 128 / 10.4) / 128)
    assert gain.ratio == pytest.approx(10.0 / 10.4)
    targets = r.targets()
    assert [t.met for t in targets] == [True, True, True]
    assert targets[0].measured == f"{10.0 / 10.4:.3f}"
    assert targets[1].measured == "+2.4 ms (1-token requests)"


def test_targets_not_met_and_not_measured_say_so() -> None:
    slow = result_with(
        [
            RunRecord("mqtt", 1, 8, 8.0, samples(8, 1.0, 0.1)),
            RunRecord("direct", 1, 8, 7.0, samples(8, 0.9, 0.1)),
            RunRecord("mqtt", 8, 8, 8.0, samples(8, 1.0, 0.1)),
            RunRecord("direct", 8, 8, 2.0, samples(8, 0.5, 0.1)),
        ]
    )
    at64, added, gain = slow.targets()
    assert at64.met is None and at64.measured == "not measured"
    # no 1-token measurement: the full-length requests stand in, and say so
    assert added.met is False and added.measured.endswith("(full-length requests)")
    assert gain.met is False and "from concurrency 1 to 8" in gain.text


def test_errors_are_counted_not_hidden() -> None:
    failing = [Sample(0.5, None, 0, "engine_unavailable")] * 3 + [Sample(0.2, None, 0, "timeout")]
    rec = RunRecord("mqtt", 4, 8, 2.0, samples(4, 1.0, 0.1) + failing)
    assert rec.errors == 4
    data = rec.to_json()
    assert data["errors"] == 4 and data["requests"] == 8
    assert data["error_codes"] == {"engine_unavailable": 3, "timeout": 1}
    # rates count the answered requests only
    assert data["rps"] == pytest.approx(4 / 2.0)
    md = report.markdown(result_with([rec]))
    assert "| 4 | MQTT | 8 | 4 |" in md
    assert "errors at concurrency 4, mqtt: engine_unavailable 3, timeout 1" in md


def test_results_json_round_trips() -> None:
    r = two_paths()
    r.runs.append(RunRecord("mqtt", 128, 256, 3.0, samples(5, 2.0, 0.5), interrupted=True))
    r.interrupted = True
    r.runs[0].gpu_peak = {"0: NVIDIA H200": 140 * 2**30}
    data = json.loads(json.dumps(r.to_json()))
    back = BenchResult.from_json(data)
    assert back.to_json() == data
    assert data["kind"] == "deploykit-bench" and data["interrupted"] is True
    assert data["gpu_peak_bytes"] == {"0: NVIDIA H200": 140 * 2**30}
    with pytest.raises(ValueError, match="not a deploykit-bench result"):
        BenchResult.from_json({**data, "kind": "other"})


def test_the_markdown_report_has_the_tables_and_the_setup() -> None:
    r = two_paths()
    r.engine_memory = enginelog.parse(
        (LOGS / "cpu-vllm-0.32-bench.log").read_text().splitlines()
    ).to_json()
    r.gpu = {"source": "none: the cpu stack has no GPU", "totals": {}}
    md = report.markdown(r)
    assert md.startswith("## deploykit bench: `s` (none on cpu, model `bench`, vLLM 0.32.0)\n")
    assert "`deploykit bench --name s` (" in md and "load average 0.50 before" in md
    assert "128 output tokens (fixed: ignore_eos)" in md
    assert "| 64 | MQTT | 64 | 0 | 6.15 | 787.7 |" in md
    assert "| 64 | 0.962 | 0.962 | +100.0 ms | +100.0 ms |" in md
    assert "Gain from concurrency 1 to 64 (output tokens/s): MQTT 6.15x, direct 6.40x" in md
    assert "KV cache 1.00 GiB, 131,072 tokens" in md
    assert "Peak GPU memory: none: the cpu stack has no GPU." in md
    assert md.count("| met |") == 3
    r.interrupted = True
    assert "**interrupted**" in report.markdown(r)


def test_the_picture_is_a_png(tmp_path: Path) -> None:
    out = plot.bench_png(two_paths(), tmp_path / "deep" / "results.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    methods = plot.methods_png({"none": two_paths(), "fp8": two_paths()}, tmp_path / "m.png")
    assert methods.read_bytes()[:4] == b"\x89PNG"


# --- engine memory from recorded vLLM logs ------------------------------------------------------


def test_engine_memory_from_recorded_start_up_logs() -> None:
    gpu = enginelog.parse((LOGS / "h200-vllm-0.24-8b.log").read_text().splitlines())
    assert gpu == enginelog.EngineMemory(14.96, "vLLM: model loading", 112.41, 920864, "GPU")
    bench = enginelog.parse((LOGS / "h200-vllm-0.24-bench.log").read_text().splitlines())
    assert (bench.weights_gib, bench.kv_cache_gib, bench.kv_cache_tokens) == (
        0.23,
        127.9,
        16763536,
    )
    cpu = enginelog.parse((LOGS / "cpu-vllm-0.32-bench.log").read_text().splitlines())
    assert (cpu.weights_gib, cpu.kv_cache_gib, cpu.kv_cache_tokens, cpu.device) == (
        0.23,
        1.0,
        131072,
        "CPU",
    )
    assert "checkpoint size on disk" in (cpu.weights_source or "")
    assert enginelog.parse(["nothing here"]).describe() == "not in the engine's log"


def test_a_restarted_engine_counts_its_last_start_up() -> None:
    lines = (LOGS / "h200-vllm-0.24-bench.log").read_text().splitlines()
    lines += (LOGS / "h200-vllm-0.24-8b.log").read_text().splitlines()
    assert enginelog.parse(lines).weights_gib == 14.96


# --- peak GPU memory from recorded NVML inventories ---------------------------------------------


def test_gpu_memory_of_the_pinned_gpus_from_recorded_inventories() -> None:
    h200 = devices.load_inventory(DATA / "h200-nvml.json")
    gpu = h200.gpus[0]
    assert gpumemory.used(h200, [gpu.uuid]) == {"0: NVIDIA H200": 150754820096 - 150109880320}
    assert gpumemory.used(h200, ["0"]) == gpumemory.used(h200, [gpu.uuid])
    assert gpumemory.used(h200, ["GPU-other"]) == {}
    two = devices.load_inventory(DATA / "h100x2-nvml.json")
    second = two.gpus[1]
    assert list(gpumemory.totals(two, [second.uuid])) == [f"1: {second.name}"]


def test_the_sampler_keeps_the_peak_between_takes() -> None:
    h200 = devices.load_inventory(DATA / "h200-nvml.json")
    gpu = h200.gpus[0]
    # vLLM reserved 132365 MiB of the H200 (tests/data: nvidia-smi during the GPU benchmark)
    serving = dataclasses.replace(gpu, memory_free=gpu.memory_total - 132365 * 2**20)
    readings = iter([h200, h200, dataclasses.replace(h200, gpus=(serving,)), h200, h200])
    sampler = gpumemory.Sampler(lambda: next(readings), [gpu.uuid])  # one read for the totals
    assert sampler.totals == {"0: NVIDIA H200": gpu.memory_total}
    assert sampler.take() == {"0: NVIDIA H200": gpu.memory_total - gpu.memory_free}
    sampler._sample()  # the thread's reading while the engine serves
    assert sampler.take() == {"0: NVIDIA H200": 132365 * 2**20}
    assert sampler.take() == {"0: NVIDIA H200": gpu.memory_total - gpu.memory_free}
    assert gpumemory.peaks([{"a": 1, "b": 5}, {"a": 3}]) == {"a": 3, "b": 5}


def test_no_gpu_no_sampler() -> None:
    sampler, why = gpumemory.sampler_for(())
    assert sampler is None and why == "none: the cpu stack has no GPU"


def test_concurrency_and_requests_per_level() -> None:
    from deploykit.bench.runner import Load
    from deploykit.commands.bench.show import parse_concurrency

    assert parse_concurrency("64, 1,8,8") == (1, 8, 64)
    for bad in ("", "0,8", "one"):
        with pytest.raises(UsageError, match="--concurrency"):
            parse_concurrency(bad)
    default = Load(concurrency=(1, 8, 64))
    assert [default.requests_at(c) for c in (1, 8, 64)] == [8, 16, 128]
    # never fewer requests than asked to be in flight at once
    assert [Load(requests=10).requests_at(c) for c in (1, 64)] == [10, 64]


def test_a_serve_instance_s_engine_is_reached_without_docker(tmp_path: Path) -> None:
    """A `deploykit serve` instance's engine is on loopback: bench and compare reach it from a
    helper process (no Docker client is passed), read the project's settings from the instance's
    bridge config with the bridge's own code, and its start-up figures from serve's engine log."""
    from deploykit.bench import engine, runner
    from deploykit.secrets import ensure_secrets
    from deploykit.serve.record import ServeState
    from deploykit.stack import StackRecord

    ensure_secrets(tmp_path / "secrets", ("bench", "other"))
    config = tmp_path / "bridge.yaml"
    config.write_text(limits.bench_config(None))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "engine.log").write_text(
        "INFO Model loading took 14.96 GiB memory and 3.1 seconds\n"
        "INFO Available KV cache memory: 112.41 GiB\nINFO GPU KV cache size: 920,864 tokens\n"
    )
    state = ServeState(
        engine_url="http://127.0.0.1:8000",
        engine_api_key_file=tmp_path / "secrets" / "engine_api_key",
        bridge_url="http://127.0.0.1:8081",
        broker_url="mqtt://127.0.0.1:18893",
        local_broker=True,
        logs_dir=tmp_path / "logs",
        supervisor_pid=1,
        vllm_python="/opt/vllm/bin/python",
        vllm_version="0.24.0",
    )
    record = StackRecord(
        name="served", folder=tmp_path, quant="none", gpu_class="cpu", served_model_name="demo",
        projects=("bench", "other"), mqtt_port=18893, secrets_dir=tmp_path / "secrets",
        bridge_name="bridge-1", serve=state, bridge_config=config,
    )  # fmt: skip
    target = runner.prepare(record, None, "bench", runner.Load(concurrency=(1, 256)))
    assert isinstance(target.engine, engine.ServeEngine)
    assert (target.address.host, target.address.port) == ("127.0.0.1", 18893)
    assert target.credentials.username == "bench"
    assert target.settings.rate_limit_per_minute is None and target.settings.fixed_length
    assert target.engine.vllm == "0.24.0"
    assert "/opt/vllm/bin/python" in (target.engine.runs_in or "")
    memory = enginelog.parse(target.engine.log_lines())
    assert (memory.weights_gib, memory.kv_cache_tokens) == (14.96, 920864)
    # the other project has the default rate limit: refused with what to do, as for compose
    with pytest.raises(UsageError, match="rate limit of 1200") as err:
        runner.prepare(record, None, "other", runner.Load())
    assert "--print-config" in (err.value.hint or "")
    # a compose stack still needs Docker
    with pytest.raises(UsageError, match="runs in Docker"):
        engine.connect(dataclasses.replace(record, serve=None), None)
