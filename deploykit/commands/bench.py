"""CLI command: bench. The measuring lives in ``deploykit.bench``; this module parses, shows
progress, writes the files and maps the outcome to an exit status."""

from __future__ import annotations

import datetime as dt
import shlex
import sys
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from deploykit import hoststacks, stack
from deploykit.bench import limits, methods, output, plot, prompts, runner
from deploykit.bench.gpumemory import sampler_for
from deploykit.bench.results import BenchResult, RunRecord
from deploykit.commands import options
from deploykit.commands.build import warn
from deploykit.commands.methodstacks import method_stack
from deploykit.commands.stack import free_port
from deploykit.devices import GPU_SPEC_HELP
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


def print_config(name: str | None, state_dir: Path, project: str) -> None:
    """The stack's bridge config plus the bench project; the bench project alone for a stack that
    does not exist yet (to start it with)."""
    try:
        record = options.find(name, state_dir)
    except UsageError:
        _err.print("no such stack yet: the bench project alone", markup=False)
        sys.stdout.write(limits.bench_config(None, project))
        return
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


def measure(
    record: stack.StackRecord, docker: Docker, project: str, load: runner.Load
) -> BenchResult:
    """One stack's benchmark with progress on the terminal (runner.run)."""
    target = runner.prepare(record, docker, project, load)
    _err.print(
        f"bench: stack {record.name!r}, {record.quant} on {record.gpu_class}, model "
        f"{record.served_model_name!r}",
        markup=False,
    )
    _err.print(f"bench: {limits.statement(target.settings, max(load.concurrency))}", markup=False)
    sampler, gpu_source = sampler_for(record.gpu_ids)
    gpu = {"source": gpu_source, "totals": sampler.totals if sampler else {}}
    command = shlex.join(["deploykit", *sys.argv[1:]])
    try:
        with ShowProgress(_err) as progress:
            return runner.run(target, load, progress, sampler=sampler, gpu=gpu, command=command)
    finally:
        if sampler is not None:
            sampler.stop()


def finish(results: list[BenchResult], folder: Path, stack_hint: str) -> None:
    """Exit as the results say: 130 when interrupted, 1 when requests failed (all counted)."""
    if any(r.interrupted for r in results):
        _err.print("interrupted: the files hold what was measured until Ctrl-C", markup=False)
        raise typer.Exit(130)
    failed = sum(x.errors for r in results for x in r.runs)
    if failed:
        total = sum(len(x.samples) for r in results for x in r.runs)
        raise CheckFailed(
            f"{failed} of {total} measured requests failed (counted in the results: "
            f"{folder / 'results.md'})",
            f"see `deploykit logs {stack_hint}` and `deploykit health {stack_hint}`",
        )


def run_methods(
    plans: list[methods.MethodPlan], load: runner.Load, folder: Path, *, timeout: float
) -> dict[str, BenchResult]:
    """Each method that runs here, one stack after another (methodstacks.method_stack).
    Ctrl-C stops the one running; what was measured is kept."""
    docker = Docker.connect()
    results: dict[str, BenchResult] = {}
    for mp in plans:
        if mp.plan is None:
            continue
        try:
            with method_stack(mp.plan, timeout, _say) as record:
                result = measure(record, docker, limits.BENCH_PROJECT, load)
        except KeyboardInterrupt:
            _say(f"{mp.method}: interrupted before measuring")
            break
        results[mp.method] = result
        output.write_bench(result, folder / mp.method)
        if result.interrupted:
            break
    return results


def _say(text: str) -> None:
    _err.print(text, markup=False)


def bench_methods(
    methods_text: str,
    model: str | None,
    gpus: str | None,
    gpu_class: str | None,
    mqtt_port: int | None,
    timeout: float,
    name: str | None,
    state_dir: Path,
    load_args: dict[str, Any],
    out: Path | None,
) -> None:
    """``bench --methods``: plan every method, run those that run here, write one table."""
    chosen = methods.parse_methods(methods_text)
    models = methods.parse_models(model, chosen)
    prefix = stack.check_stack_name(name or "bench")
    plot.require_matplotlib()
    load = make_load(**load_args)
    folder = out or default_out(f"{prefix}-methods")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "bridge-bench.yaml"
    config.write_text(limits.bench_config(None))
    port = mqtt_port if mqtt_port is not None else free_port(18830)
    plans = methods.plan_methods(
        chosen, models, name_prefix=prefix, state_dir=state_dir, bridge_config=config,
        gpus=gpus, gpu_class=gpu_class, mqtt_port=port,
    )  # fmt: skip
    running = {s.name for s in hoststacks.list_stacks() if s.running}
    taken = [p.plan.name for p in plans if p.plan is not None and p.plan.name in running]
    if taken:
        raise UsageError(
            f"stacks named {', '.join(taken)} are running; --methods starts and stops its own",
            "pick another prefix with --name, or stop them (deploykit down --name ...)",
        )
    for p in plans:
        if p.refused is not None:
            warn(f"{p.method} does not run here: {p.refused}")
    if not any(p.plan is not None for p in plans):
        raise CheckFailed(
            f"none of the methods {', '.join(chosen)} runs here",
            "see `deploykit matrix` and `deploykit gpus`; where the checkpoint is the reason, "
            "pass a model per method (--model none=DIR,awq=DIR)",
        )
    results = run_methods(plans, load, folder, timeout=timeout)
    files = output.write_methods(results, plans, folder, shlex.join(["deploykit", *sys.argv[1:]]))
    _err.print(f"wrote {', '.join(str(f) for f in files)}", markup=False)
    finish(list(results.values()), folder, f"--name {prefix}-<method>")


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
        methods_text: str | None = typer.Option(
            None,
            "--methods",
            help="Benchmark these methods (e.g. none,fp8,awq), one stack after another on the "
            "pinned GPUs, and write one table; methods the GPUs cannot run are listed with the "
            "reason. --name is then the stacks' name prefix (default: bench).",
            show_default=False,
        ),
        model: str | None = typer.Option(
            None,
            "--model",
            help="With --methods: one model for all (folder or Hub id), or one per method "
            "(none=DIR,awq=DIR; AWQ and GPTQ need their own pre-quantized checkpoints).",
            show_default=False,
        ),
        gpus: str | None = typer.Option(
            None, "--gpus", help=f"With --methods: {GPU_SPEC_HELP}", show_default=False
        ),
        gpu_class: str | None = options.gpu_class_option(" With --methods; default: the GPUs'."),
        mqtt_port: int | None = typer.Option(
            None,
            "--mqtt-port",
            help="With --methods: the stacks' MQTT port. Default: a free one from 18830.",
            show_default=False,
        ),
        timeout: float = typer.Option(
            900.0, "--timeout", help="With --methods: seconds each stack may take to be healthy."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Measure a running stack: the same load through MQTT and directly to the engine, per
        concurrency (requests/s, output tokens/s, time to first token, latency, errors, peak GPU
        memory). Writes results.json, results.md and results.png. Ctrl-C stops and keeps what
        was measured."""
        load_args: dict[str, Any] = {
            "concurrency": concurrency,
            "requests": requests,
            "max_tokens": max_tokens,
            "prompts_file": prompts_file,
            "overhead_requests": overhead_requests,
        }
        if methods_text is not None:
            if project is not None or print_bench_config:
                raise UsageError(
                    "--project and --print-config do not go with --methods",
                    "each method's stack serves the project bench, with its limits off",
                )
            bench_methods(
                methods_text, model, gpus, gpu_class, mqtt_port, timeout, name, state_dir,
                load_args, out,
            )  # fmt: skip
            return
        alone = {
            "--model": model,
            "--gpus": gpus,
            "--gpu-class": gpu_class,
            "--mqtt-port": mqtt_port,
        }
        for flag, value in alone.items():
            if value is not None:
                raise UsageError(
                    f"{flag} goes with --methods only",
                    "a running stack is measured as it runs; --methods starts stacks of its own",
                )
        if print_bench_config:
            print_config(name, state_dir, project or limits.BENCH_PROJECT)
            return
        record = options.find(name, state_dir)
        chosen = project or (
            limits.BENCH_PROJECT if limits.BENCH_PROJECT in record.projects else record.projects[0]
        )
        plot.require_matplotlib()
        load = make_load(**load_args)
        folder = out or default_out(record.name)
        result = measure(record, Docker.connect(), chosen, load)
        files = output.write_bench(result, folder)
        _err.print(f"wrote {', '.join(str(f) for f in files)}", markup=False)
        finish([result], folder, f"--name {record.name}")
