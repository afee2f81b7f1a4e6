"""`deploykit bench` and `deploykit compare` against the real cpu stack (the demo model, small N):
a project with limits is refused with the way out, which works (`--print-config`, then `up` adds
the bench project); the output files exist and parse and their figures are positive; errors are
counted, not hidden, when the engine is stopped mid-run; Ctrl-C keeps what was measured and leaves
no helper container; `--methods` runs what the cpu stack runs and lists the rest with reasons;
compare of a stack against itself is a 100 % exact match with zero KL divergence.

Figures are checked for being there and positive, never against speeds: those are the
benchmark's to print (benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploykit import build, stack
from deploykit.bench import enginenet
from deploykit.bench.enginenet import HELPER_LABEL
from deploykit.docker import Docker

from .conftest import cli, free_port
from .test_stack_e2e import built  # noqa: F401  (the session's images, built once)

pytestmark = pytest.mark.integration

NAME = "dktest-bench"
SMALL = ["--concurrency", "1,2", "--requests", "4", "--max-tokens", "16"]


def start(*args: str) -> subprocess.Popen[str]:
    """The CLI as a user starts it from a terminal: SIGINT at its default (Ctrl-C stops it), also
    when these tests run in a background job, which inherits SIGINT ignored (and Python then
    installs no KeyboardInterrupt for it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "deploykit", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-state")


@pytest.fixture(scope="module")
def where(state: Path) -> list[str]:
    return ["--name", NAME, "--state-dir", str(state)]


@pytest.fixture(scope="module")
def bench_stack(
    built: list[build.Built],  # noqa: F811
    state: Path,
    where: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack.StackRecord]:
    """The cpu stack with project general (default limits), then bench added the way bench's
    refusal says: `bench --print-config`, and `up` with it."""
    port = str(free_port())
    up = cli(
        "up", *where, "--mqtt-port", port, "--projects", "general", "--wait", "--timeout", "300"
    )
    try:
        assert up.returncode == 0, up.stderr
        config = tmp_path_factory.mktemp("bench-config") / "bench.yaml"
        printed = cli("bench", *where, "--print-config")
        assert printed.returncode == 0, printed.stderr
        config.write_text(printed.stdout)
        again = cli(
            "up", *where, "--mqtt-port", port, "--projects", "general,bench",
            "--bridge-config", str(config), "--wait", "--timeout", "300",
        )  # fmt: skip
        assert again.returncode == 0, again.stderr
        yield stack.load_stack(NAME, state)
    finally:
        cli("down", *where)


def test_a_project_with_limits_is_refused_with_the_way_out(
    bench_stack: stack.StackRecord, where: list[str], tmp_path: Path
) -> None:
    refused = cli("bench", *where, "--project", "general", *SMALL, "--out", str(tmp_path / "r"))
    assert refused.returncode == 2, refused.stderr
    text = " ".join(refused.stderr.split())
    assert "project 'general'" in text and "a rate limit of 1200 requests a minute" in text
    assert f"deploykit bench --name {NAME} --print-config > bench.yaml" in text
    assert not (tmp_path / "r").exists()  # nothing measured, nothing written
    # what --print-config wrote (and the fixture applied): the bench project, limits off
    config = yaml.safe_load(cli("bench", *where, "--print-config").stdout)
    assert config["projects"]["bench"]["rate_limit_per_minute"] is None
    assert config["projects"]["bench"]["engine_extra"] == {"ignore_eos": True}


def test_the_files_exist_parse_and_the_figures_are_positive(
    bench_stack: stack.StackRecord, where: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "results"
    run = cli("bench", *where, *SMALL, "--overhead-requests", "4", "--out", str(out))
    assert run.returncode == 0, run.stderr
    # the project it ran on (bench, the default when served) and that no limit shapes the load
    assert "project 'bench': rate limit off" in run.stderr
    assert "no limit shapes this load" in run.stderr
    data = json.loads((out / "results.json").read_text())
    assert data["kind"] == "deploykit-bench" and data["interrupted"] is False
    assert data["stack"]["name"] == NAME and data["stack"]["vllm"] == "0.32.0"
    assert data["settings"]["fixed_length"] is True
    assert [(r["concurrency"], r["path"]) for r in data["runs"]] == [
        (1, "mqtt"), (1, "direct"), (2, "mqtt"), (2, "direct"),
    ]  # fmt: skip
    for r in data["runs"]:
        where_ = f"{r['path']} c={r['concurrency']}"
        assert r["requests"] == r["planned"] == 4 and r["errors"] == 0, where_
        assert r["rps"] > 0 and r["output_tokens_per_s"] > 0, where_
        assert 0 < r["latency_p50"] <= r["latency_p95"] <= r["latency_p99"], where_
        assert r["ttft_p50"] is not None and 0 < r["ttft_p50"] <= r["latency_p99"], where_
        assert all(s["output_tokens"] == 16 for s in r["samples"]), where_  # ignore_eos
    assert all(x["tps"] > 0 for x in data["ratios"]) and len(data["ratios"]) == 2
    assert data["gain"]["mqtt"] > 0 and data["gain"]["direct"] > 0
    assert len(data["overhead"]["mqtt_s"]) == 4 and len(data["overhead"]["direct_s"]) == 4
    assert data["engine_memory"]["kv_cache_tokens"] > 0
    assert data["gpu"]["source"] == "none: the cpu stack has no GPU"
    md = (out / "results.md").read_text()
    assert "| 2 | MQTT | 4 | 0 |" in md and "| 2 | direct | 4 | 0 |" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_of_a_stack_with_itself_is_exact_with_zero_kl(
    bench_stack: stack.StackRecord, where: list[str], tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello! Who are you?\nWhere is the key?\nTell me a story.\n")
    side = f"stack:{NAME}"
    run = cli(
        "compare", "--baseline", side, "--candidate", side, "--state-dir", where[3],
        "--prompts", str(prompts), "--max-tokens", "16", "--out", str(tmp_path / "c"),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads((tmp_path / "c" / "compare.json").read_text())
    c = data["comparison"]
    assert c["prompts"] == 3 and c["positions"] == sum(c["baseline_tokens"]) > 0
    assert c["exact_rate"] == 1.0 and c["mean_prefix_share"] == 1.0
    assert c["kl"] == [0.0] * c["positions"] and c["mean_kl"] == 0.0
    assert c["top1_agreement"] == 1.0
    # how much of the distribution the top 20 held: the demo model's is flat, so little, but some
    assert 0 < c["mean_covered"] <= 1
    assert "| exact match | 3/3 (100.0 %) |" in run.stdout
    # asking for log-probabilities did not kill the cpu engine (TORCHDYNAMO_DISABLE)
    assert cli("health", *where).returncode == 0


def test_ctrl_c_keeps_what_was_measured(
    bench_stack: stack.StackRecord, where: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "interrupted"
    proc = start(
        # long enough runs (~5 s each at c=1 on the demo model) that the signal lands in the
        # one after the first: with 6 requests the whole benchmark once ended within that second
        "bench", *where, "--concurrency", "1,2", "--requests", "30", "--max-tokens", "64",
        "--overhead-requests", "0", "--out", str(out),
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith("c=1 direct: "):  # the first run is done, the second has begun
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            break
    _out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted: the files hold what was measured" in rest
    data = json.loads((out / "results.json").read_text())
    assert data["interrupted"] is True
    assert data["runs"][0]["path"] == "mqtt" and data["runs"][0]["requests"] == 30
    assert all(r["concurrency"] == 1 for r in data["runs"])
    assert "**interrupted**" in (out / "results.md").read_text()
    docker = Docker.connect()
    assert docker.containers({HELPER_LABEL: NAME}) == [], "a helper container was left behind"


class InterruptedOnceCreated(Docker):
    """The real Docker client, but Ctrl-C reaches this process just after the helper container
    was created and started, before start_helper returns its handle (how CI once left one)."""

    def start_helper(self, *args: Any, **kwargs: Any) -> Any:
        container = super().start_helper(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return container


def test_ctrl_c_while_the_helper_is_created_leaves_no_helper(
    bench_stack: stack.StackRecord,
) -> None:
    docker = InterruptedOnceCreated.connect()
    net = enginenet.find(bench_stack, docker)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            enginenet.run_job(docker, net, {"kind": "load"}, lambda _line: None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert docker.containers({HELPER_LABEL: NAME}) == [], "a helper container was left behind"


def test_methods_runs_what_the_cpu_stack_runs_and_says_why_not_the_rest(
    built: list[build.Built],  # noqa: F811
    state: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "methods"
    run = cli(
        "bench", "--methods", "none,fp8,squeezellm", "--name", "dktest-bm", "--state-dir",
        str(state), "--mqtt-port", str(free_port()), *SMALL, "--overhead-requests", "0",
        "--out", str(out), "--timeout", "300",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    data = json.loads((out / "results.json").read_text())
    runs = {m["method"]: m for m in data["methods"]}
    assert runs["none"]["runs"] is True and runs["none"]["gpu_class"] == "cpu"
    assert "CUDA kernels" in runs["fp8"]["refused"]
    assert "removed from vLLM" in runs["squeezellm"]["refused"]
    none = data["results"]["none"]
    assert all(r["errors"] == 0 and r["output_tokens_per_s"] > 0 for r in none["runs"])
    md = (out / "results.md").read_text()
    assert "| none | `demo` |" in md and "- fp8: " in md and "- squeezellm: " in md
    assert (out / "none" / "results.json").is_file() and (out / "results.png").is_file()
    # the method's stack is gone again
    assert Docker.connect().containers({stack.COMPOSE_PROJECT_LABEL: "dktest-bm-none"}) == []


def test_errors_are_counted_when_the_engine_stops_mid_run(
    bench_stack: stack.StackRecord, where: list[str], tmp_path: Path
) -> None:
    """Last in this module: it stops the engine (and starts it again afterwards)."""
    docker = Docker.connect()
    (engine,) = docker.containers(
        {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: "engine"}
    )
    out = tmp_path / "errors"
    proc = start(
        "bench", *where, "--concurrency", "2", "--requests", "80", "--max-tokens", "64",
        "--overhead-requests", "0", "--out", str(out),
    )  # fmt: skip
    assert proc.stderr is not None
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("c=2 mqtt: "):  # the measured MQTT run has begun
                time.sleep(1.0)  # some answered first; the run takes several seconds here
                engine.stop(timeout=5)
                break
        _out, rest = proc.communicate(timeout=600)
    finally:
        engine.start()
    assert proc.returncode == 1, "".join(seen) + rest
    assert "measured requests failed" in rest
    data = json.loads((out / "results.json").read_text())
    mqtt, direct = data["runs"]
    # every request is accounted for: answered, or counted as an error with its code
    assert mqtt["requests"] == mqtt["planned"] == 80
    assert mqtt["errors"] > 0 and sum(mqtt["error_codes"].values()) == mqtt["errors"]
    assert set(mqtt["error_codes"]) <= {"engine_unavailable", "overloaded", "engine_error"}
    assert direct["requests"] == direct["errors"] == 80  # the engine stayed down
    md = (out / "results.md").read_text()
    assert "errors at concurrency 2, mqtt: " in md and "errors at concurrency 2, direct: " in md
    assert cli("health", *where, "--wait", "--timeout", "300").returncode == 0
