"""CLI command: bench. The measuring lives in ``deploykit.bench``; this package parses, shows
progress (``show``), runs ``--methods`` (``methods``), writes the files and maps the outcome to an
exit status."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer
import yaml

from deploykit.bench import limits, output, plot
from deploykit.commands import options
from deploykit.commands.bench.methods import bench_methods
from deploykit.commands.bench.show import default_out, err, finish, make_load, measure
from deploykit.docker import Docker
from deploykit.errors import UsageError


def print_config(name: str | None, state_dir: Path, project: str) -> None:
    """The stack's bridge config plus the bench project; the bench project alone for a stack that
    does not exist yet (to start it with)."""
    try:
        record = options.find(name, state_dir)
    except UsageError:
        err.print("no such stack yet: the bench project alone", markup=False)
        sys.stdout.write(limits.bench_config(None, project))
        return
    existing = None
    if record.bridge_config is not None:
        try:
            existing = yaml.safe_load(record.bridge_config.read_text()) or None
        except (OSError, yaml.YAMLError) as exc:
            raise UsageError(
                f"cannot read the stack's bridge config {record.bridge_config}: {exc}",
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
        methods_text: str | None = typer.Option(
            None,
            "--methods",
            help="Benchmark these methods (e.g. none,fp8,awq), one stack after another on the "
            "pinned GPUs, and write one table; methods the GPUs cannot run are listed with the "
            "reason. --name is then the stacks' name prefix (default: bench).",
            show_default=False,
        ),
        model: str | None = options.methods_model_option("With --methods"),
        gpus: str | None = options.methods_gpus_option("With --methods"),
        gpu_class: str | None = options.gpu_class_option(" With --methods; default: the GPUs'."),
        mqtt_port: int | None = options.methods_mqtt_port_option("With --methods"),
        timeout: float = options.methods_timeout_option("With --methods"),
        serve: bool = typer.Option(
            False,
            "--serve",
            help="With --methods: run each method as a `deploykit serve` instance (local "
            "processes, no Docker) instead of a compose stack.",
        ),
        vllm_python: str | None = typer.Option(
            None,
            "--vllm-python",
            help="With --methods --serve: the python of the environment with vLLM. Default: "
            "the one running deploykit.",
            show_default=False,
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
            if vllm_python is not None and not serve:
                raise UsageError("--vllm-python goes with --serve", "add --serve")
            bench_methods(
                methods_text, model, gpus, gpu_class, mqtt_port, timeout, name, state_dir,
                load_args, out, serve=serve, vllm_python=vllm_python,
            )  # fmt: skip
            return
        alone = {
            "--serve": True if serve else None,
            "--vllm-python": vllm_python,
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
        docker = Docker.connect() if record.serve is None else None
        result = measure(record, docker, chosen, load)
        files = output.write_bench(result, folder)
        err.print(f"wrote {', '.join(str(f) for f in files)}", markup=False)
        finish([result], folder, f"--name {record.name}")
