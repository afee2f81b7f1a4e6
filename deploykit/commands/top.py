"""CLI command: top."""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from deploykit import top
from deploykit.commands import options
from deploykit.docker import Docker
from deploykit.stack import StackRecord


def _num(value: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if value is None else fmt.format(value)


def render_view(record: StackRecord, v: top.View) -> Group:
    title = (
        f"deploykit top: stack {record.name}, {record.quant} on {record.gpu_class}, "
        f"model {record.served_model_name}; rates over the last {v.window_s:.0f} s "
        "(Ctrl-C to leave)"
    )
    projects = Table(title="projects (bridge)", title_justify="left")
    for col in ("project", "req/s", "in flight", "queued", "errors", "tokens/s", "p50 latency"):
        projects.add_column(col, justify="left" if col == "project" else "right")
    for r in v.projects:
        projects.add_row(
            r.project,
            _num(r.requests_per_s, "{:.2f}"),
            str(r.in_flight),
            str(r.queued),
            str(r.errors),
            _num(r.tokens_per_s),
            "-" if r.p50_s is None else f"{r.p50_s * 1000:.0f} ms",
        )
    e = v.engine
    engine = Table(title="engine (vLLM)", title_justify="left")
    for col in ("running", "waiting", "KV cache", "tokens/s"):
        engine.add_column(col, justify="right")
    engine.add_row(
        _num(e.running, "{:d}"),
        _num(e.waiting, "{:d}"),
        "-" if e.kv_cache_use is None else f"{e.kv_cache_use * 100:.1f} %",
        _num(e.tokens_per_s),
    )
    parts: list[Table | Text] = [Text(title, style="bold"), projects, engine]
    if record.gpu_class == "cpu":
        parts.append(Text("GPU memory: none (cpu stack)", style="dim"))
    elif v.gpus:
        gpus = Table(title="GPU memory", title_justify="left")
        for col in ("GPU", "used", "total"):
            gpus.add_column(col, justify="left" if col == "GPU" else "right")
        for name, used, total in v.gpus:
            gpus.add_row(name, f"{used / 2**30:.1f} GiB", f"{total / 2**30:.1f} GiB")
        parts.append(gpus)
    else:
        parts.append(Text("GPU memory: NVML is not available here", style="dim"))
    for problem in v.problems:
        parts.append(Text(f"! {problem}", style="yellow"))
    return Group(*parts)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("top")
    def top_cmd(
        interval: float = typer.Option(2.0, "--interval", help="Seconds between refreshes."),
        window: float = typer.Option(
            10.0, "--window", help="Seconds the rates and the p50 latency are taken over."
        ),
        once: bool = typer.Option(
            False, "--once", help="Print one view (two samples --interval apart) and exit."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """A live view of the running stack: per project requests/s, in flight, queued, errors,
        tokens/s and p50 latency; the engine's running and waiting requests, KV cache use and
        tokens/s; GPU memory. Read from the bridge's and vLLM's metrics inside their containers."""
        record = options.find_compose(name, state_dir)
        docker = Docker.connect()
        samples: deque[top.Sample] = deque()

        def step() -> top.View:
            samples.append(top.sample(record, docker, top.pinned_gpu_memory))
            while len(samples) > 2 and samples[-1].at - samples[1].at >= window:
                samples.popleft()
            return top.view(samples[0], samples[-1], record.projects)

        console = Console(highlight=False)
        if once:
            step()
            time.sleep(interval)
            console.print(render_view(record, step()))
            return
        try:
            with Live(render_view(record, step()), console=console, screen=True) as live:
                while True:
                    time.sleep(interval)
                    live.update(render_view(record, step()))
        except KeyboardInterrupt:
            return
