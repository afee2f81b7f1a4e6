"""CLI commands: up, down, ps, logs, ls."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from deploykit import credentials, health, hoststacks, plan, render, stack
from deploykit.commands import options
from deploykit.commands.build import build_cells, warn
from deploykit.devices import GPU_SPEC_HELP
from deploykit.docker import Docker
from deploykit.errors import UsageError
from deploykit.mqttclient import parse_broker_url
from deploykit.ports import MQTT_PORT, MQTT_TLS_PORT

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


def free_port(start: int) -> int:
    """The first port from ``start`` up that nothing on this host listens on."""
    for port in range(start, min(start + 200, 65536)):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    return start


def _check_port(name: str, port: int) -> None:
    """Refuse a port another deploykit stack publishes, naming that stack."""
    holder = hoststacks.port_holder(port, name)
    if holder is None:
        return
    other = free_port(port + 1)
    raise UsageError(
        f"the MQTT port {port} is taken by the stack {holder.name!r} ({holder.state}, from "
        f"{holder.folder}); this stack is {name!r}",
        f"give this stack another port: --mqtt-port {other} (make: MQTT_PORT={other}), or stop "
        f"the other one: deploykit down --name {holder.name}",
    )


class WaitReport:
    """Progress while ``up --wait``/``health --wait`` waits: a spinner on a terminal, else a line
    whenever the first failing layer changes and every 15 s."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tty = console.is_terminal
        self.status = console.status("waiting for the health checks") if self.tty else None
        self.last: tuple[str, float] = ("", -1e9)

    def __enter__(self) -> WaitReport:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.status is not None:
            self.status.stop()

    def __call__(self, results: list[health.CheckResult], elapsed: float) -> None:
        first = next((r for r in results if not r.passed), None)
        if first is None:
            return
        line = f"waiting for {first.name} ({elapsed:.0f} s): {first.detail}"
        if self.status is not None:
            self.status.update(line[:150])
        elif first.name != self.last[0] or elapsed - self.last[1] >= 15:
            self.console.print(line, markup=False)
            self.last = (first.name, elapsed)


def wait_for(record: stack.StackRecord, timeout: float, project: str | None = None) -> float:
    """Wait until every health check of the stack passes; returns the seconds waited."""
    target = health.StackTarget(record, Docker.connect(), project=project)
    with WaitReport(_err) as report:
        results, waited = health.wait_healthy(
            lambda: health.default_checks(target), timeout_s=timeout, on_round=report
        )
    if not all(r.passed for r in results):
        print_checks(results)
        raise health.failure(results, waited)
    return waited


def print_checks(results: list[health.CheckResult]) -> None:
    table = Table("check", "ok", "detail")
    for r in results:
        mark = {"ok": "[green]ok[/]", "skip": "[yellow]skip[/]"}.get(str(r.status), "[red]FAIL[/]")
        table.add_row(r.name, mark, r.detail)
    _out.print(table)


def next_steps(record: stack.StackRecord, where: str) -> list[str]:
    """What to type next, as lines: each command with what it does."""
    dk = options.program()
    project = record.projects[0]
    rows = [
        (f"{dk} chat --project {project}{where}", "talk to it over MQTT"),
        (
            f"{dk} credentials --project {project}{where}",
            "broker address, username, password file, client snippets",
        ),
        (f"{dk} top{where}", "live requests/s, tokens/s, latency, KV cache"),
        (f"{dk} down{where}", "stop it and remove its containers and data"),
    ]
    width = max(len(c) for c, _ in rows)
    return [f"  {c.ljust(width)}  {what}" for c, what in rows]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("up")
    def up_cmd(
        quant: str = options.quant_option(extra=" Which runs on which GPU: `deploykit matrix`."),
        gpus: str | None = typer.Option(
            None,
            "--gpus",
            help=GPU_SPEC_HELP + " Default: GPU 0, or the cpu stack when there is no GPU.",
        ),
        gpu_class: str | None = options.gpu_class_option(
            " Default: the class of the pinned GPUs; needed only where NVML cannot tell."
        ),
        model: str | None = typer.Option(
            None,
            "--model",
            help="Hugging Face model id, or a local checkpoint folder (mounted read-only). "
            "Default: the method's default model; the cpu stack serves a built-in demo model.",
        ),
        projects: str = typer.Option(
            "general",
            "--projects",
            help="Comma-separated projects (one MQTT account each). On a running stack, new "
            "projects are added and the broker loads their accounts.",
        ),
        wait: bool = options.wait_option(),
        timeout: float = options.timeout_option(),
        mqtt_port: int = typer.Option(MQTT_PORT, "--mqtt-port", help="Host port of the broker."),
        wheelhouse: Path | None = typer.Option(
            None, "--wheelhouse", help="Wheels for building missing images."
        ),
        base_image: str | None = typer.Option(None, "--base-image", help="For missing images."),
        build_first: bool = typer.Option(
            False,
            "--build",
            help="Build first, as `deploykit build` does: images whose templates or code changed "
            "are rebuilt, up-to-date ones reused. Without it only missing images are built.",
        ),
        rebuild: bool = options.rebuild_option("stack's images"),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
        secrets_dir: Path | None = typer.Option(
            None, "--secrets-dir", help="Secrets folder. Default: the stack's folder/secrets."
        ),
        max_model_len: str | None = options.max_model_len_option(),
        gpu_memory_utilization: float | None = options.gpu_memory_utilization_option(),
        kv_cache_dtype: str | None = options.kv_cache_dtype_option(),
        reasoning_parser: str | None = options.reasoning_parser_option(),
        bridge_config: Path | None = options.bridge_config_option(),
        force: bool = options.force_option(
            "Start even when the pre-flight gate refuses (GPU, driver, checkpoint, memory)."
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
        replicas: int | None = typer.Option(
            None,
            "--replicas",
            help="Engine+bridge pairs, each on its own share of --gpus; more than one share "
            "the work and the sessions' state (Redis). Default: one, or --gpus / --tp.",
        ),
        tp: int | None = typer.Option(
            None,
            "--tp",
            help="GPUs per engine (tensor parallel): --gpus 0,1,2,3 --tp 2 is two replicas of "
            "two GPUs. Default: --gpus / --replicas.",
        ),
        redis_port: int | None = typer.Option(
            None,
            "--redis-port",
            help="Broker host: publish the replicas' Redis on this host port, so worker hosts "
            "can join (see `deploykit credentials --worker`).",
        ),
        role: str = typer.Option(
            "all",
            "--role",
            help="all: broker, engines and bridges; worker: engines and bridges joining another "
            "host's broker (needs --worker-credentials).",
        ),
        broker: str | None = typer.Option(
            None,
            "--broker",
            help="Worker: the broker to join, mqtt://HOST:PORT (default: the bundle's).",
        ),
        worker_credentials: Path | None = typer.Option(
            None,
            "--worker-credentials",
            help="Worker: the folder `deploykit credentials --worker NAME` wrote on the broker host.",
        ),
    ) -> None:
        """Start the stack (building missing images), pinned to the chosen GPUs.

        Without a GPU: the cpu stack with a tiny demo model. Run it again with more --projects to
        add projects to the running stack.
        """
        bundle = None
        if role not in ("all", "worker"):
            raise UsageError(f"--role {role!r}: all or worker", "e.g. --role worker")
        if role == "worker":
            if worker_credentials is None:
                raise UsageError(
                    "--role worker needs --worker-credentials DIR",
                    "on the broker host: deploykit credentials --worker NAME --out DIR; copy DIR here",
                )
            bundle = credentials.read_worker_bundle(worker_credentials)
            if broker is not None:
                parse_broker_url(broker)
            projects = ",".join(bundle.projects)  # the broker host's accounts
        elif broker is not None or worker_credentials is not None:
            raise UsageError(
                "--broker and --worker-credentials are for --role worker",
                "add --role worker, or leave them out",
            )
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
            force=force,
            mqtt_tls_cert=mqtt_tls_cert,
            mqtt_tls_key=mqtt_tls_key,
            mqtt_tls_port=mqtt_tls_port,
            replicas=replicas,
            tp=tp,
            redis_port=redis_port,
            worker_name=bundle.worker if bundle else None,
            broker_url=(broker or bundle.broker_url) if bundle else None,
            redis_url=bundle.redis_url if bundle else None,
            worker_secrets=bundle.folder if bundle else None,
        )
        planned = stack.plan_up(request, warn=warn)
        stack.check_engine_can_read(planned)
        if role != "worker":
            _check_port(planned.name, planned.options.mqtt_port)
        docker = Docker.connect()
        images = render.stack_images([planned.cell], planned.options.image_version)
        if planned.options.shared:
            images.append(render.redis_image(planned.options.image_version))
        if build_first or rebuild or not all(docker.image_exists(i.tag) for i in images):
            _err.print(
                "rebuilding the stack's images"
                if rebuild
                else "building the stack's images"
                if build_first
                else "building missing images"
            )
            build_cells(
                docker,
                [planned.cell],
                base_image,
                wheelhouse,
                rebuild=rebuild,
                redis=planned.options.shared,
            )
        start = time.monotonic()
        _err.print(
            f"starting stack {planned.name!r} (compose waits until the engine has loaded the model)"
        )
        compose_file = stack.up(planned)
        record = stack.load_record(planned.folder)
        gpus_used = ",".join(planned.options.gpu_ids) if planned.cell.gpu_class != "cpu" else "none"
        pairs = (
            f", {planned.options.replicas} replicas of {planned.options.tensor_parallel_size} "
            "GPU(s)"
            if planned.options.replicas > 1 and planned.cell.gpu_class != "cpu"
            else f", {planned.options.replicas} replicas"
            if planned.options.replicas > 1
            else ""
        )
        _err.print(
            f"stack {planned.name!r} up: {planned.cell.quant} on {planned.cell.gpu_class}, "
            f"GPUs {gpus_used}{pairs}, projects {','.join(record.projects)}, "
            + (
                f"joined {planned.options.broker_url} as worker {planned.options.worker_name} "
                if role == "worker"
                else f"MQTT on port {record.mqtt_port} "
            )
            + f"({compose_file})",
            soft_wrap=True,
        )
        if wait:
            wait_for(record, timeout)
            _err.print(f"healthy {time.monotonic() - start:.1f} s after up")
        where = (
            ""
            if name is None and state_dir == stack.DEFAULT_STATE_DIR
            else f" --name {planned.name}"
        )
        _err.print("next:")
        for line in next_steps(record, where):
            _err.print(line, markup=False, soft_wrap=True)

    @app.command("down")
    def down_cmd(
        keep_data: bool = typer.Option(
            False, "--keep-data", help="Keep the broker's volume and the stack's record."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Stop the stack and remove its containers, networks and volumes (its secrets stay)."""
        record = options.find_compose(name, state_dir)
        stack.down(record, keep_data=keep_data)
        if not keep_data:
            stack.forget_stack(record.folder)
        _err.print(f"stack {record.name!r} down")

    @app.command("ps")
    def ps_cmd(
        name: str | None = options.name_option(), state_dir: Path = options.state_dir_option()
    ) -> None:
        """List the stack's containers: service, container, state (health), published ports."""
        record = options.find_compose(name, state_dir)
        rows = [
            ("service", "container", "state", "ports"),
            *hoststacks.stack_containers(record.name),
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:  # plain columns, never wrapped: each service on one line
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[3])

    @app.command("logs")
    def logs_cmd(
        services: list[str] = typer.Argument(
            None, help="Services to show (broker, engine, bridge); default: all."
        ),
        follow: bool = typer.Option(
            False, "--follow", "-f", help="Keep printing new lines (Ctrl-C to stop)."
        ),
        tail: str = typer.Option(
            "200", "--tail", help="Lines to show from the end of each service's log, or 'all'."
        ),
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Show the stack's logs."""
        stack.logs(options.find_compose(name, state_dir), services or [], follow=follow, tail=tail)

    @app.command("ls")
    def ls_cmd(as_json: bool = options.json_option()) -> None:
        """List the deploykit stacks on this host (from their containers' labels)."""
        stacks = hoststacks.list_stacks()
        if as_json:
            print(json.dumps([s.to_json() for s in stacks], indent=2))
            return
        if not stacks:
            _err.print("no deploykit stacks on this host; start one with `deploykit up`")
            return
        table = Table("name", "state", "MQTT port", "projects", "method", "model", "folder")
        for column in table.columns:
            column.overflow = "fold"
        for s in stacks:
            r = s.to_json()
            table.add_row(
                s.name,
                s.state,
                str(s.mqtt_port or "-"),
                ",".join(r["projects"] or []) or "-",
                f"{r['quant']} on {r['gpu_class']}" if r["quant"] else "-",
                r["model"] or "-",
                r["folder"] or "-",
            )
        _out.print(table)
