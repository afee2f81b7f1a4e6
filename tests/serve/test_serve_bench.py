"""``deploykit bench`` against ``deploykit serve`` instances, on real parts: ``bench --methods
none,awq --serve`` starts a serve instance for each method this host runs (the cpu cell, with vLLM's
CPU build and a tiny random-weight model), measures it through MQTT and directly over HTTP to the
engine's loopback port, stops it, and lists the method it cannot run with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import VLLM_PYTHON, free_port

pytestmark = pytest.mark.integration


def test_bench_methods_through_serve_instances(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "results"
    state = tmp_path / "state"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [
            sys.executable, "-m", "deploykit", "bench",
            "--methods", "none,awq", "--serve",
            "--model", str(tiny_model), "--vllm-python", VLLM_PYTHON,
            "--name", "sbench", "--state-dir", str(state),
            "--mqtt-port", str(free_port()),
            "--concurrency", "1,4", "--requests", "8", "--max-tokens", "8",
            "--overhead-requests", "2", "--out", str(out), "--timeout", "900",
    ]  # fmt: skip
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=1500,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    assert "awq does not run here" in done.stderr
    # one table: the method that ran, and the one that did not with the gate's reason
    table = (out / "results.md").read_text()
    assert "| none |" in table and "- awq:" in table.split("Not run here:")[1]
    result = json.loads((out / "none" / "results.json").read_text())
    runs = {(r["path"], r["concurrency"]): r for r in result["runs"]}
    assert set(runs) == {(p, c) for p in ("mqtt", "direct") for c in (1, 4)}
    for run in runs.values():
        assert run["errors"] == 0 and len(run["samples"]) == 8
        assert all(
            s["output_tokens"] == 8 for s in run["samples"]
        )  # the bench project's ignore_eos
    # what ran it: serve's vLLM, its version read from that Python; the engine's own figures
    assert VLLM_PYTHON in result["stack"]["engine_image"]
    assert result["stack"]["vllm"] and result["stack"]["quant"] == "none"
    assert result["engine_memory"]["device"] == "CPU" and result["engine_memory"]["kv_cache_tokens"]
    assert (
        "from a helper process on the serve instance's host"
        in (out / "none" / "results.md").read_text()
    )
    # serve's output and its processes' logs stay with the figures
    assert "serving 'sbench-none'" in (out / "none-serve.log").read_text()
    assert "KV cache" in (out / "none-logs" / "engine.log").read_text()
    # nothing left running: serve stopped cleanly, its record is gone, and no process works in
    # its folder (serve starts its broker, vLLM and bridge there)
    assert "serve 'sbench-none' stopped (exit 0)" in done.stderr
    assert not (state / "sbench-none" / "stack.json").exists()
    assert processes_in(state) == []


def processes_in(folder: Path) -> list[str]:
    """Processes whose working directory is in ``folder``, as "pid command"."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(str(folder.resolve())):
            found.append(f"{entry.name} {command}")
    return found
