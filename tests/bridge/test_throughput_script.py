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
    """The processes whose parent is ``pid``, with their command lines (from /proc)."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # the fields after the command name, which may hold spaces and parentheses
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
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
                any("deploykit.bridge" in c for c in _children(proc.pid).values())
                or proc.poll() is not None
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
