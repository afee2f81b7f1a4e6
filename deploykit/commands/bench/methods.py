"""``deploykit bench --methods``: plan every method as ``up`` would, run those that run here one
after another, each as a compose stack (deploykit/commands/methodstacks.py) or, with ``--serve``,
as a ``deploykit serve`` instance (deploykit/commands/methodserve.py); write one table."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from deploykit import hoststacks, stack
from deploykit.bench import limits, methods, output, plot, runner
from deploykit.bench.results import BenchResult
from deploykit.commands.bench.show import default_out, finish, make_load, measure, say
from deploykit.commands.build import warn
from deploykit.commands.methodserve import ServeOptions, method_serve
from deploykit.commands.methodstacks import method_stack
from deploykit.commands.stack import free_port
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, UsageError


def run_methods(
    plans: list[methods.MethodPlan],
    load: runner.Load,
    folder: Path,
    *,
    timeout: float,
    serve: ServeOptions | None = None,
) -> dict[str, BenchResult]:
    """Each method that runs here, one after another: a compose stack each
    (methodstacks.method_stack), or a serve instance each (methodserve.method_serve).
    Ctrl-C stops the one running; what was measured is kept."""
    docker = Docker.connect() if serve is None else None
    results: dict[str, BenchResult] = {}
    for mp in plans:
        if mp.plan is None:
            continue
        running = (
            method_stack(mp.plan, timeout, say)
            if serve is None
            else method_serve(mp, serve, folder, timeout, say)
        )
        try:
            with running as record:
                result = measure(record, docker, limits.BENCH_PROJECT, load)
        except KeyboardInterrupt:
            say(f"{mp.method}: interrupted before measuring")
            break
        results[mp.method] = result
        output.write_bench(result, folder / mp.method)
        if result.interrupted:
            break
    return results


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
    serve: bool = False,
    vllm_python: str | None = None,
) -> None:
    """``bench --methods``: plan every method, run those that run here, write one table.
    ``serve``: each method as a ``deploykit serve`` instance (vLLM from ``vllm_python``)."""
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
        gpus=gpus, gpu_class=gpu_class, mqtt_port=port, images=not serve,
    )  # fmt: skip
    serve_options = None
    if serve:
        _check_no_serve_running(plans)
        serve_options = ServeOptions(
            state_dir=state_dir,
            mqtt_port=port,
            engine_port=free_port(28000),
            bridge_port=free_port(28100),
            bridge_config=config.resolve(),
            vllm_python=vllm_python,
            gpus=gpus,
            gpu_class=gpu_class,
        )
    else:
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
        elif not serve:
            assert p.plan is not None
            stack.check_engine_can_read(p.plan)
    if not any(p.plan is not None for p in plans):
        raise CheckFailed(
            f"none of the methods {', '.join(chosen)} runs here",
            "see `deploykit matrix` and `deploykit gpus`; where the checkpoint is the reason, "
            "pass a model per method (--model none=DIR,awq=DIR)",
        )
    results = run_methods(plans, load, folder, timeout=timeout, serve=serve_options)
    files = output.write_methods(results, plans, folder, shlex.join(["deploykit", *sys.argv[1:]]))
    say(f"wrote {', '.join(str(f) for f in files)}")
    finish(list(results.values()), folder, f"--name {prefix}-<method>")


def _check_no_serve_running(plans: list[methods.MethodPlan]) -> None:
    """Refuse names of serve instances that run already, or of compose stacks (serve would
    refuse each in its turn, after the methods before it were measured)."""
    from deploykit.serve import host

    for p in plans:
        if p.plan is None:
            continue
        if (p.model or p.plan.options.model) is None:
            raise UsageError(
                f"--serve needs a model for {p.method}: the cpu cell's built-in demo model lives "
                "in the cpu engine image",
                "pass a checkpoint folder with --model (e.g. one made by "
                "templates/engine/cpu/make_demo_model.py)",
            )
        host.check_not_running(p.plan.name, p.plan.folder)
