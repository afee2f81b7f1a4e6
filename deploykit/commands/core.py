"""CLI commands: matrix, render."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploykit.errors import CheckFailed, UsageError
from deploykit.files import check_files, prune_stale, write_files
from deploykit.k8s import K8sOptions, render_k8s
from deploykit.matrix import GPU_CLASSES, METHODS, cells, resolve_target
from deploykit.mqttclient import parse_broker_url
from deploykit.render import StackOptions, ci_images, render_all, render_cell
from deploykit.secrets import ensure_secrets


def matrix_table() -> Table:
    table = Table(title="deploykit matrix: quantization method x GPU class", show_lines=False)
    table.add_column("method")
    table.add_column("GPU class")
    table.add_column("runs")
    table.add_column("min CC", justify="right")
    table.add_column("vLLM args")
    table.add_column("why / notes", overflow="fold")
    for cell in cells():
        table.add_row(
            str(cell.quant),
            str(cell.gpu_class),
            "[green]yes[/]" if cell.supported else "[red]no[/]",
            "-" if cell.min_compute_capability is None else f"{cell.min_compute_capability:g}",
            " ".join(cell.vllm_args) or "-",
            cell.reason,
        )
    return table


def matrix_markdown() -> str:
    """The matrix as a Markdown table (the README's copy is generated from this)."""
    lines = [
        "| method | GPU class | runs | min CC | vLLM args | why / notes |",
        "|---|---|---|---|---|---|",
    ]
    for cell in cells():
        cc = "-" if cell.min_compute_capability is None else f"{cell.min_compute_capability:g}"
        if cell.supported:
            args = (
                f"`{' '.join(cell.vllm_args)}`"
                if cell.vllm_args
                else "(detected from the checkpoint)"
            )
            lines.append(
                f"| {cell.quant} | {cell.gpu_class} | yes | {cc} | {args} | {cell.reason} |"
            )
        else:
            lines.append(f"| {cell.quant} | {cell.gpu_class} | no | - | - | {cell.reason} |")
    lines.append("")
    lines.append(
        "GPU classes: "
        + "; ".join(f"`{c}`: {s.title}, {s.examples}" for c, s in GPU_CLASSES.items())
    )
    lines.append("")
    lines.append(
        "Methods: " + "; ".join(f"`{q}`: {m.note or m.removed}" for q, m in METHODS.items())
    )
    return "\n".join(lines) + "\n"


def _render_k8s(quant: str, gpu_class: str, out: Path | None, options: K8sOptions) -> None:
    """Write one cell's manifests into ``out`` and the secrets they read into ``out/secrets``."""
    if out is None:
        raise UsageError("--k8s needs --out", "e.g. deploykit render --k8s --out ./k8s")
    if options.broker is not None:
        parse_broker_url(options.broker)  # a bad URL is refused here, not in a crash-looping pod
    bundle = render_k8s(resolve_target(quant, gpu_class), options)
    written = write_files(bundle, out)
    ensure_secrets(out / "secrets", options.projects)
    typer.echo(
        f"rendered {len(written)} Kubernetes files under {out}; secrets in {out / 'secrets'} "
        "(owner-only: keep them out of version control); apply with kubectl apply -k " + str(out)
    )


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("matrix")
    def matrix_command(
        as_json: bool = typer.Option(False, "--json", help="Print a JSON list of cells."),
        markdown: bool = typer.Option(False, "--markdown", help="Print a Markdown table."),
        images: bool = typer.Option(
            False,
            "--images",
            help="Print the images to build as JSON: every supported cell's engine, the bridge, "
            "the broker and Redis (CI's build matrix).",
        ),
    ) -> None:
        """Show which quantization methods run on which GPU classes, and why."""
        if images:
            typer.echo(json.dumps(ci_images(), separators=(",", ":")))
        elif as_json:
            typer.echo(json.dumps([c.to_json() for c in cells()], indent=2))
        elif markdown:
            typer.echo(matrix_markdown(), nl=False)
        else:
            Console().print(matrix_table())

    @app.command("render")
    def render_command(
        quant: str | None = typer.Option(
            None, "--quant", "-q", help="Render one cell: its method."
        ),
        gpu_class: str | None = typer.Option(
            None, "--gpu-class", "-c", help="Render one cell: its GPU class."
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Output folder (default: the repository)."
        ),
        check: bool = typer.Option(
            False,
            "--check",
            help="Write nothing; fail when images/ or compose/ differ from the templates.",
        ),
        k8s: bool = typer.Option(
            False,
            "--k8s",
            help="Kubernetes manifests and a kustomization into --out (default cell: none on cpu).",
        ),
        replicas: int = typer.Option(
            1, "--replicas", help="--k8s: engine+bridge pairs (more than one: Redis too)."
        ),
        tp: int = typer.Option(1, "--tp", help="--k8s: GPUs per engine (tensor parallel)."),
        projects: str = typer.Option("general", "--projects", help="--k8s: projects to serve."),
        model: str | None = typer.Option(
            None, "--model", help="--k8s: Hugging Face model id (default: the method's)."
        ),
        broker: str | None = typer.Option(
            None,
            "--broker",
            help="--k8s: an external broker, mqtt[s]://HOST:PORT (default: one in the cluster).",
        ),
        registry: str = typer.Option(
            "deploykit", "--registry", help="--k8s: image names are REGISTRY/engine:TAG, ..."
        ),
    ) -> None:
        """Render Dockerfiles and compose stacks: every supported cell, or one (--quant, --gpu-class);
        or, with --k8s, Kubernetes manifests of one cell."""
        if k8s:
            _render_k8s(
                quant or "none",
                gpu_class or "cpu",
                out,
                K8sOptions(
                    replicas=replicas,
                    gpus_per_replica=tp,
                    projects=tuple(p.strip() for p in projects.split(",") if p.strip()),
                    model=model,
                    broker=broker,
                    registry=registry,
                ),
            )
            return
        one = quant is not None or gpu_class is not None
        if one and (quant is None or gpu_class is None):
            raise UsageError(
                "--quant and --gpu-class go together", "give both to render one cell, or neither"
            )
        if one and check:
            raise UsageError(
                "--check compares the whole repository", "leave out --quant/--gpu-class"
            )
        if one:
            assert quant is not None and gpu_class is not None
            cell = resolve_target(quant, gpu_class)
            if out is None:
                raise UsageError("--out is needed to render one cell", "e.g. --out ./my-stack")
            bundle = render_cell(cell, StackOptions(secrets_dir="./secrets"))
        else:
            bundle = render_all()
        root = out if out is not None else Path.cwd()
        if check:
            differ = check_files(bundle, root)
            if differ:
                for line in differ:
                    typer.echo(f"  {line}", err=True)
                raise CheckFailed(
                    f"{len(differ)} rendered file(s) are not what the templates produce",
                    "run `deploykit render` (or `make render`) and commit images/ and compose/",
                )
            typer.echo(f"render --check: {len(bundle.files)} files are current")
            return
        if not one and not (root / "templates").is_dir():
            raise UsageError(
                f"{root} is not a deploykit repository (no templates/ folder)",
                "run it from the repository's top, or render one cell with --quant, --gpu-class and --out",
            )
        written = write_files(bundle, root)
        removed = [] if one else prune_stale(bundle, root)
        typer.echo(
            f"rendered {len(written)} files under {root}"
            + (f", removed {len(removed)} stale" if removed else "")
        )
