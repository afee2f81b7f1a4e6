"""What ``deploykit bench`` shows and how it ends, for one stack or many (``--methods``): the
progress, one line per run, the load from the command's options, the exit status."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from deploykit import stack
from deploykit.bench import limits, prompts, runner
from deploykit.bench.gpumemory import sampler_for
from deploykit.bench.results import BenchResult, RunRecord
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, UsageError
from deploykit.loadgen import Sample

err = Console(stderr=True, highlight=False, soft_wrap=True)


def say(text: str) -> None:
    err.print(text, markup=False)


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
    """A progress bar on a terminal (a line when a run begins elsewhere); a line per finished run
    everywhere."""

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
        if self.bar is None:  # a log: say when each run begins, as the bar would
            self.console.print(f"{label}: {total} requests ...", markup=False)
            return
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


def measure(
    record: stack.StackRecord, docker: Docker | None, project: str, load: runner.Load
) -> BenchResult:
    """One stack's benchmark with progress on the terminal (runner.run); ``docker`` for a
    compose stack (a serve instance needs none)."""
    target = runner.prepare(record, docker, project, load)
    err.print(
        f"bench: stack {record.name!r}, {record.quant} on {record.gpu_class}, model "
        f"{record.served_model_name!r}",
        markup=False,
    )
    err.print(f"bench: {limits.statement(target.settings, max(load.concurrency))}", markup=False)
    sampler, gpu_source = sampler_for(record.gpu_ids)
    gpu = {"source": gpu_source, "totals": sampler.totals if sampler else {}}
    command = shlex.join(["deploykit", *sys.argv[1:]])
    try:
        with ShowProgress(err) as progress:
            return runner.run(target, load, progress, sampler=sampler, gpu=gpu, command=command)
    finally:
        if sampler is not None:
            sampler.stop()


def finish(results: list[BenchResult], folder: Path, stack_hint: str) -> None:
    """Exit as the results say: 130 when interrupted, 1 when requests failed (all counted)."""
    if any(r.interrupted for r in results):
        err.print("interrupted: the files hold what was measured until Ctrl-C", markup=False)
        raise typer.Exit(130)
    failed = sum(x.errors for r in results for x in r.runs)
    if failed:
        total = sum(len(x.samples) for r in results for x in r.runs)
        raise CheckFailed(
            f"{failed} of {total} measured requests failed (counted in the results: "
            f"{folder / 'results.md'})",
            f"see `deploykit logs {stack_hint}` and `deploykit health {stack_hint}`",
        )


def make_load(
    concurrency: str,
    requests: int | None,
    max_tokens: int,
    prompts_file: Path | None,
    overhead_requests: int,
) -> runner.Load:
    prompt_list, source = prompts.load(prompts_file)
    return runner.Load(
        concurrency=parse_concurrency(concurrency),
        requests=requests,
        max_tokens=max_tokens,
        prompts=prompt_list,
        prompt_source=source,
        overhead_requests=overhead_requests,
    )
