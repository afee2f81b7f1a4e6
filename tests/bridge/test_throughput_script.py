"""benchmarks/bridge_throughput.py, the load generator of the bridge's benchmarks, against the real
vLLM CPU server of these tests and real Mosquitto: it measures both paths and counts what failed,
and a run ended by SIGTERM stops the broker and the bridges it started."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from .conftest import Broker, Engine, wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bridge_throughput.py"


def _children(pid: int) -> dict[int, str]:
    """The processes ``pid`` started from its main thread, with their command lines (Linux's
    /proc/PID/task/PID/children)."""
    found: dict[int, str] = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        found[int(child)] = cmdline.replace(b"\0", b" ").decode()
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_both_paths_are_measured_with_the_bridge_cost(
    engine: Engine, broker: Broker, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    # fmt: off
    argv = [
        sys.executable, str(SCRIPT),
        "--engine", engine.url, "--broker", f"mqtt://127.0.0.1:{broker.port}",
        "--concurrency", "2", "--modes", "whole,stream", "--max-tokens", "8",
        "--rounds", "2", "--min-requests", "4", "--json", str(out),
    ]
    # fmt: on
    run = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(out.read_text())
    assert data["complete"] is True
    cells = {(c["path"], c["stream"]): c for c in data["cells"]}
    assert set(cells) == {(p, s) for p in ("direct", "mqtt") for s in (False, True)}
    for (path, stream), cell in cells.items():
        assert cell["requests"] == 4 and cell["errors"] == {}, (path, stream, cell)
        assert cell["output_tokens_per_s"] > 0
        if path == "mqtt":
            assert cell["bridge_cpu_ms"] > 0 and cell["broker_cpu_ms"] is None
        if stream:
            assert cell["ttft_p50"] is not None and cell["ttft_p50"] <= cell["latency_p50"]
    assert "| mqtt (current) | yes | 2 | 4 | 0 |" in run.stdout


def test_sigterm_stops_what_the_run_started(engine: Engine, tmp_path: Path) -> None:
    # fmt: off
    argv = [
        sys.executable, str(SCRIPT), "--engine", engine.url,
        "--concurrency", "4", "--modes", "stream", "--max-tokens", "64",
        "--rounds", "50", "--json", str(tmp_path / "results.json"),
    ]
    # fmt: on
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # its own broker, then the bridge under test
        wait_until(
            lambda: (
                proc.poll() is not None
                or any("deploykit.bridge" in c for c in _children(proc.pid).values())
            ),
            60,
            "the bridge under test to start",
        )
        started = _children(proc.pid)
        assert any("mosquitto" in c for c in started.values()), started
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, out  # interrupted, not finished
    left = [f"{pid} {cmd}" for pid, cmd in started.items() if _alive(pid)]
    assert not left, f"still running after SIGTERM: {left}"
