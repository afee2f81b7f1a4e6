"""CLI command: bench. The measuring lives in ``deploykit.bench``; this module parses, shows
progress, writes the files and maps the outcome to an exit status."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from deploykit.bench import limits, plot, prompts, report, runner
from deploykit.bench.gpumemory import sampler_for
from deploykit.bench.results import BenchResult, RunRecord
from deploykit.commands import options
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, UsageError
from deploykit.loadgen import Sample

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def parse_concurrency(text: str) -> tuple[int, ...]:
    """``1,8,32,64`` -> (1, 8, 32, 64), ascending; UsageError for anything else."""
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise UsageError(
            f"--concurrency {text!r}: give numbers of requests at once, each at least 1",
            "e.g. --concurrency 1,8,32,64",
        )
    return tuple(values)


def default_out(stack: str) -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return Path("bench-results") / f"{stack}-{stamp}"


class ShowProgress:
    """A progress bar on a terminal; a line per finished run everywhere."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar: RichProgress | None = None
        self.task: Any = None
        if console.is_terminal:
            self.bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("errors {task.fields[errors]}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )

    def __enter__(self) -> ShowProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start(self, label: str, total: int) -> None:
        self.errors = 0
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task(label, total=total, errors=0)

    def advance(self, sample: Sample) -> None:
        if sample.error is not None:
            self.errors += 1
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, errors=self.errors)

    def done(self, record: RunRecord) -> None:
        r = record.run
        p50, ttft = r.latency(50), r.ttft(50)
        self.console.print(
            f"c={record.concurrency:<4} {record.path:6} {len(record.samples):5} requests "
            f"{r.rps:7.2f} req/s {r.tps:8.1f} tok/s  TTFT p50 "
            f"{'-' if ttft is None else f'{ttft:.3f} s'}  p50 "
            f"{'-' if p50 is None else f'{p50:.3f} s'}  errors {record.errors}",
            markup=False,
        )

    def note(self, text: str) -> None:
        self.console.print(text, markup=False)


def write_results(result: BenchResult, out: Path) -> list[Path]:
    """results.json, results.md and results.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "results.json", out / "results.md", out / "results.png"]
    files[0].write_text(json.dumps(result.to_json(), indent=1) + "\n")
    files[1].write_text(report.markdown(result))
    plot.bench_png(result, files[2])
    return files


def print_config(record: Any, project: str) -> None:
    existing = None
    if record.bridge_config is not None:
        try:
            existing = yaml.safe_load(record.bridge_config.read_text()) or None
        except (OSError, yaml.YAMLError) as err:
            raise UsageError(
                f"cannot read the stack's bridge config {record.bridge_config}: {err}",
                "fix or restore the file, or start from an empty config",
            ) from None
    sys.stdout.write(limits.bench_config(existing, project))


def register(app: typer.Typer) -> None:
    """Add this module's command to the app."""

    @app.command("bench")
    def bench_cmd(
        project: str | None = typer.Option(
            None,
            "--project",
            "-p",
            help="Project to measure through; its rate limits must be off. Default: bench when "
            "the stack serves it, else its first project.",
            show_default=False,
        ),
        concurrency: str = typer.Option(
            "1,8,32,64", "--concurrency", help="Comma-separated numbers of requests at once."
        ),
        requests: int | None = typer.Option(
            None,
            "--requests",
            min=1,
            help="Requests per concurrency. Default: twice the concurrency, at least 8.",
            show_default=False,
        ),
        max_tokens: int = typer.Option(128, "--max-tokens", min=1, help="Output tokens asked for."),
        prompts_file: Path | None = typer.Option(
            None,
            "--prompts",
            help="Prompts, one per line (or .jsonl). Default: the kit's prompt set.",
            show_default=False,
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Folder for results.json, results.md, results.png. Default: "
            "bench-results/<stack>-<time>.",
            show_default=False,
        ),
        overhead_requests: int = typer.Option(
            20,
            "--overhead-requests",
            min=0,
            help="1-token requests per path at concurrency 1, for the MQTT path's fixed cost "
            "(0: skip).",
        ),
        print_bench_config: bool = typer.Option(
            False,
            "--print-config",
            help="Print a bridge config (the stack's own plus a bench project whose limits are "
            "off) to pass to `up --bridge-config`; measure nothing.",
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Measure a running stack: the same load through MQTT and directly to the engine, per
        concurrency (requests/s, output tokens/s, time to first token, latency, errors, peak GPU
        memory). Writes results.json, results.md and results.png. Ctrl-C stops and keeps what
        was measured."""
        record = options.find(name, state_dir)
        chosen = project or (
            limits.BENCH_PROJECT if limits.BENCH_PROJECT in record.projects else record.projects[0]
        )
        if print_bench_config:
            print_config(record, project or limits.BENCH_PROJECT)
            return
        plot.require_matplotlib()
        prompt_list, source = prompts.load(prompts_file)
        load = runner.Load(
            concurrency=parse_concurrency(concurrency),
            requests=requests,
            max_tokens=max_tokens,
            prompts=prompt_list,
            prompt_source=source,
            overhead_requests=overhead_requests,
        )
        docker = Docker.connect()
        target = runner.prepare(record, docker, chosen, load)
        folder = out or default_out(record.name)
        _err.print(
            f"bench: stack {record.name!r}, {record.quant} on {record.gpu_class}, model "
            f"{record.served_model_name!r}",
            markup=False,
        )
        _err.print(
            f"bench: {limits.statement(target.settings, max(load.concurrency))}", markup=False
        )
        sampler, gpu_source = sampler_for(record.gpu_ids)
        gpu = {"source": gpu_source, "totals": sampler.totals if sampler else {}}
        command = shlex.join(["deploykit", *sys.argv[1:]])
        try:
            with ShowProgress(_err) as progress:
                result = runner.run(
                    target, load, progress, sampler=sampler, gpu=gpu, command=command
                )
        finally:
            if sampler is not None:
                sampler.stop()
        files = write_results(result, folder)
        _err.print(f"wrote {', '.join(str(f) for f in files)}", markup=False)
        if result.interrupted:
            _err.print("interrupted: the files hold what was measured until Ctrl-C", markup=False)
            raise typer.Exit(130)
        failed = sum(r.errors for r in result.runs)
        if failed:
            total = sum(len(r.samples) for r in result.runs)
            raise CheckFailed(
                f"{failed} of {total} measured requests failed (counted in the results: "
                f"{folder / 'results.md'})",
                f"see `deploykit logs --name {record.name}` and `deploykit health --name "
                f"{record.name}`",
            )
