"""CLI commands: gpus, doctor, plan."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from deploykit.checks import Status as CheckStatus
from deploykit.checks import run_checks
from deploykit.devices import (
    GIB,
    GPU_SPEC_HELP,
    GpuInventory,
    dumps_inventory,
    load_inventory,
    read_inventory,
    resolve_gpu_spec,
)
from deploykit.doctor import default_checks, report_json
from deploykit.errors import CheckFailed, DeployKitError, GpuError, ModelError, UsageError
from deploykit.gpucatalogue import CATALOGUE, catalogue_gpus
from deploykit.matrix import gpu_class_for
from deploykit.plan import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    Plan,
    Status,
    make_plan,
    parse_length,
    read_model,
)

_STATUS_STYLE = {
    Status.COMPATIBLE: "[green]compatible[/]",
    Status.LOW_MEMORY: "[yellow]low memory[/]",
    Status.INCOMPATIBLE: "[red]incompatible[/]",
}
_CHECK_STYLE = {
    CheckStatus.OK: "[green]  ok[/]",
    CheckStatus.FAIL: "[red]FAIL[/]",
    CheckStatus.SKIP: "[dim]skip[/]",
}


def gpus_table(inv: GpuInventory) -> Table:
    d = inv.driver
    table = Table(title=f"NVIDIA driver {d.driver_version}, CUDA {d.cuda_version}")
    for col in ("index", "name", "CC", "memory total", "memory free", "MIG", "PCI bus", "UUID"):
        table.add_column(col, justify="right" if col.startswith(("memory", "CC")) else "left")
    for g in inv.gpus:
        mig = "n/a" if g.mig_mode is None else ("on" if g.mig_mode else "off")
        table.add_row(
            str(g.index),
            escape(g.name),
            f"{g.compute_capability:.1f}",
            f"{g.memory_total_gib:.1f} GiB",
            f"{g.memory_free_gib:.1f} GiB",
            mig,
            g.pci_bus_id,
            g.uuid,
        )
    return table


def catalogue_table() -> Table:
    table = Table(title="GPUs `deploykit plan --gpu` knows", box=box.SIMPLE_HEAD)
    for col in ("--gpu", "name", "memory", "CC", "class", "kind", "source"):
        table.add_column(col, justify="right" if col in ("memory", "CC") else "left")
    table.columns[0].no_wrap = True
    table.columns[-1].overflow = "fold"
    for g in CATALOGUE:
        try:
            cls = str(gpu_class_for(g.compute_capability))
        except DeployKitError:
            cls = "unsupported"
        table.add_row(
            g.key,
            escape(g.name),
            f"{g.memory_bytes / GIB:.1f} GiB",
            f"{g.compute_capability:.1f}",
            cls,
            g.kind,
            escape(g.source),
        )
    return table


def plan_table(plan: Plan) -> Table:
    m = plan.model
    table = Table(
        box=box.SIMPLE_HEAD,
        title=escape(
            f"{m.path}: {m.architecture}, {m.params / 1e9:.1f}B params, {m.checkpoint.description}; "
            f"gpu_memory_utilization {plan.gpu_memory_utilization}"
        ),
        show_lines=False,
    )
    table.caption = "weights: GiB, all GPUs together; KV/1k: GiB per 1000 tokens per GPU"
    for col in ("#", "quant", "TP", "KV", "status", "weights", "KV/1k", "max len"):
        left = col in ("quant", "KV", "status")
        table.add_column(col, justify="left" if left else "right", no_wrap=True)
    for i, p in enumerate(plan.profiles, 1):
        table.add_row(
            str(i),
            str(p.quant),
            str(p.tensor_parallel_size),
            p.kv_cache_dtype,
            _STATUS_STYLE[p.status],
            "-" if p.weights_gib is None else f"{p.weights_gib:.1f}",
            "-" if p.kv_gib_per_1k_tokens is None else f"{p.kv_gib_per_1k_tokens:.3f}",
            "-" if p.max_model_len_fit is None else str(p.max_model_len_fit),
        )
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("gpus")
    def gpus_command(
        as_json: bool = typer.Option(False, "--json", help="Print JSON (recordable as test data)."),
        catalogue: bool = typer.Option(
            False,
            "--catalogue",
            help="List the named GPUs `deploykit plan --gpu` knows (no GPU needed), with sources.",
        ),
    ) -> None:
        """List this host's NVIDIA GPUs (NVML): index, UUID, compute capability, memory, MIG, driver.

        Exits 5 when there is no NVIDIA driver.
        """
        if catalogue:
            if as_json:
                typer.echo(json.dumps([g.to_json() for g in CATALOGUE], indent=2))
            else:
                Console(highlight=False).print(catalogue_table())
            return
        inv = read_inventory()
        if as_json:
            typer.echo(dumps_inventory(inv), nl=False)
        else:
            Console().print(gpus_table(inv))

    @app.command("doctor")
    def doctor_command(
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        gpu_class: str = typer.Option(
            "cuda",
            "--gpu-class",
            "-c",
            help="'cpu' leaves out the NVIDIA driver and runtime checks.",
        ),
    ) -> None:
        """Check this host: Docker, compose, NVIDIA driver and runtime, disk, broker. Exit 0 only when all pass."""
        results = run_checks(default_checks(gpu=gpu_class.strip().lower() != "cpu"))
        if as_json:
            typer.echo(json.dumps(report_json(results), indent=2))
        else:
            console = Console(highlight=False)
            for r in results:
                console.print(
                    f"{_CHECK_STYLE[r.status]}  [bold]{escape(r.name)}[/]: {escape(r.detail)}"
                )
                if r.hint:
                    console.print(f"      [yellow]hint:[/] {escape(r.hint)}")
        failed = [r.name for r in results if not r.passed]
        if failed:
            raise CheckFailed(
                f"{len(failed)} check(s) failed: {', '.join(failed)}", "follow the hints above"
            )

    @app.command("plan")
    def plan_command(
        model: Path = typer.Option(
            ..., "--model", "-m", help="Local model directory (config.json, safetensors)."
        ),
        quant: str | None = typer.Option(
            None,
            "--quant",
            "-q",
            help="Only this method (refused if the checkpoint does not fit it).",
        ),
        gpus: str = typer.Option("all", "--gpus", "-g", help=GPU_SPEC_HELP),
        gpus_file: Path | None = typer.Option(
            None,
            "--gpus-file",
            help="Plan for another machine: a saved `deploykit gpus --json` instead of this host's GPUs.",
        ),
        gpu: str | None = typer.Option(
            None,
            "--gpu",
            help="Plan for named GPUs instead of this host's: H100-80GB, RTX-4090-24GB, ... "
            "(`deploykit gpus --catalogue` lists them).",
        ),
        count: int = typer.Option(1, "--count", help="How many --gpu GPUs (tensor parallel)."),
        max_model_len: str | None = typer.Option(
            None,
            "--max-model-len",
            help="Context length to fit: 8192, 32k (x1000), 32K (x1024); default: the model's maximum.",
        ),
        kv_cache_dtype: str | None = typer.Option(
            None, "--kv-cache-dtype", help="auto or fp8 (default: list both)."
        ),
        tensor_parallel_size: int | None = typer.Option(
            None, "--tensor-parallel-size", "--tp", help="Only this tensor-parallel size."
        ),
        gpu_memory_utilization: float = typer.Option(
            DEFAULT_GPU_MEMORY_UTILIZATION,
            "--gpu-memory-utilization",
            help="Fraction of each GPU's TOTAL memory vLLM may use (vLLM's default 0.92).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Which methods, tensor-parallel sizes and KV dtypes fit this model on these GPUs, best first.

        Exits 6 when the checkpoint does not match --quant or nothing fits.
        """
        if gpu is not None and gpus_file is not None:
            raise UsageError("--gpu and --gpus-file both say which GPUs", "give one of them")
        info = read_model(model)
        if gpu is not None:
            selected = list(catalogue_gpus(gpu, count))
        else:
            try:
                inv = load_inventory(gpus_file) if gpus_file else read_inventory()
            except GpuError as err:
                raise GpuError(
                    err.message,
                    f"{err.hint}; or plan for named GPUs: --gpu H100-80GB [--count 2] "
                    "(`deploykit gpus --catalogue`), or for another machine: --gpus-file FILE",
                ) from None
            selected = resolve_gpu_spec(gpus, inv.gpus)
        plan = make_plan(
            info,
            selected,
            quant=quant,
            max_model_len=parse_length(max_model_len),
            kv_cache_dtype=kv_cache_dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
        )
        if as_json:
            typer.echo(json.dumps(plan.to_json(), indent=2))
        else:
            console = Console(highlight=False)
            console.print(plan_table(plan))
            for i, p in enumerate(plan.profiles, 1):  # reasons below: readable at any width
                console.print(f"{i:>3}. {escape(p.reason)}")
            notes = {str(p.quant): p.note for p in plan.profiles if p.note}
            for quant_name, note in notes.items():
                console.print(f"[dim]{quant_name}: {escape(note)}[/]")
            if plan.best:
                typer.echo(
                    f"best: {plan.best.quant}, tensor-parallel {plan.best.tensor_parallel_size}, "
                    f"KV {plan.best.kv_cache_dtype}: vllm serve ... {' '.join(plan.best.vllm_args)}"
                )
        if plan.best is None:
            raise ModelError(
                f"no profile fits {info.path} on GPU {', '.join(str(g.index) for g in selected)}",
                "see the reasons above: a smaller --max-model-len, more GPUs (--gpus), or a "
                "quantized checkpoint",
            )
