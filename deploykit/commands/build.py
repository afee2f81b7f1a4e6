"""CLI commands: base-images, build, wheelhouse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploykit import baseimages, build, matrix, plan, render, stack, wheelhouses
from deploykit.commands import options
from deploykit.docker import Docker

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


#: Progress lines printed as they come (the rest only updates the status line).
STEP_WORDS = (
    "Step ",
    "building ",
    "built ",
    "using ",
    "importing ",
    "downloading ",
    "installing ",
    "compiling ",
    "committing ",
)


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
        step = re.sub(r"^\[\d+/\d+\] ", "", text)  # "[3/13] building ..." (build --all)
        if step.startswith(STEP_WORDS) or (
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
    bases: dict[str, baseimages.BaseImageResult] | None = None,
    redis: bool = False,
) -> list[build.Built]:
    """The images of these cells' stacks (and Redis, for stacks of several replicas)."""
    version = [image_version] if image_version else []
    images = render.stack_images(cells, *version)
    if redis:
        images.append(render.redis_image(*version))
    with Progress(_err) as progress:
        return build.build_images(
            docker,
            images,
            base_image=base_image,
            wheelhouse=wheelhouse,
            rebuild=rebuild,
            progress=progress,
            bases=bases,
        )


def summary(bases: dict[str, baseimages.BaseImageResult], results: list[build.Built]) -> Table:
    """The local bases used and every image: base used, size, what it adds to its base, time."""
    table = Table("image", "base", "size", "on its base", "time")
    for column in table.columns:
        column.overflow = "fold"
    for name, b in bases.items():
        took = f"{b.seconds:.0f} s" if b.built else "reused"
        table.add_row(name, "(local stand-in)", gib(b.size_bytes), "", took)
    for r in results:
        took = "reused" if r.reused else f"{r.seconds:.0f} s"
        added = gib(r.size_bytes - r.base_size_bytes) if r.base_size_bytes else ""
        table.add_row(r.tag, r.base_image, gib(r.size_bytes), added, took)
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("base-images")
    def base_images_cmd(
        rebuild: bool = options.rebuild_option("base images"),
        mirror: str = typer.Option(baseimages.DEFAULT_MIRROR, "--mirror", help="Debian mirror."),
        vllm: bool = typer.Option(
            False,
            "--vllm",
            help="Build the local vLLM base of the CUDA engine images instead, from PyPI's "
            "wheels (a stand-in for the official vLLM image; on the Debian python3 base).",
        ),
        vllm_version: str = typer.Option(
            matrix.VLLM_VERSION, "--vllm-version", help="vLLM version of the --vllm base."
        ),
        wheelhouse: Path | None = options.wheelhouse_option(
            "Wheels of vLLM and its dependencies for --vllm (default: the cached wheelhouse, "
            "downloaded once; see `deploykit wheelhouse`)."
        ),
    ) -> None:
        """Build local base images (for machines that cannot pull the official ones): Debian's
        python3 and mosquitto; with --vllm, the vLLM base from PyPI's wheels."""
        docker = Docker.connect()
        with Progress(_err) as progress:
            if vllm:
                results = [
                    baseimages.ensure(
                        docker,
                        matrix.BaseKind.VLLM,
                        rebuild=rebuild,
                        mirror=mirror,
                        progress=progress,
                        wheelhouse=wheelhouse,
                        vllm_version=vllm_version,
                    )
                ]
            else:
                results = baseimages.ensure_all(
                    docker, rebuild=rebuild, mirror=mirror, progress=progress
                )
        for r in results:
            what = f"built in {r.seconds:.0f} s" if r.built else "already there"
            _out.print(f"{r.name}: {what}, {gib(r.size_bytes)}")

    @app.command("wheelhouse")
    def wheelhouse_cmd(
        vllm_version: str = typer.Option(
            matrix.VLLM_VERSION, "--vllm-version", help="vLLM version to download."
        ),
        dest: Path | None = typer.Option(
            None,
            "--dest",
            help="Folder to download into (default: this machine's cache, where builds look).",
            show_default=False,
        ),
    ) -> None:
        """Download the wheels the CUDA engine images install: vLLM and its dependencies for the
        local vLLM base's Python, and the methods' extra packages. Carry the folder to a machine
        without the package index and pass it with --wheelhouse."""
        set_ = matrix.WheelSet.VLLM_CUDA
        with Progress(_err) as progress:
            if dest is None:
                folder = wheelhouses.ensure(set_, progress, vllm_version)
            elif dest.is_dir() and not wheelhouses.missing(dest, set_, vllm_version):
                folder = dest
            else:
                folder = wheelhouses.download(set_, dest, progress, vllm_version)
        wheels = list(folder.glob("*.whl"))
        size = sum(w.stat().st_size for w in wheels)
        _out.print(f"{folder}: {len(wheels)} wheels, {gib(size)}")

    @app.command("build")
    def build_cmd(
        quant: str = options.quant_option(),
        gpu_class: str | None = options.gpu_class_option(" Default: this host's GPU 0, else cpu."),
        all_cells: bool = typer.Option(False, "--all", help="Every supported cell's engine."),
        base_image: str | None = typer.Option(
            None, "--base-image", help="Base image for engine and bridge (default: official)."
        ),
        wheelhouse: Path | None = options.wheelhouse_option(
            "Folder of wheels the images install from (default: the cached ones, downloaded once)."
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
        bases: dict[str, baseimages.BaseImageResult] = {}
        results = build_cells(docker, cells, base_image, wheelhouse, rebuild=rebuild, bases=bases)
        if as_json:
            print(
                json.dumps(
                    {
                        "bases": [b.__dict__ for b in bases.values()],
                        "images": [r.__dict__ for r in results],
                    },
                    indent=2,
                )
            )
            return
        _out.print(summary(bases, results))
