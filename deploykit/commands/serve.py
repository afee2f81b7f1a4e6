"""CLI command: serve (one cell as local processes, without Docker)."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console

from deploykit import matrix, plan, stack
from deploykit.commands import options
from deploykit.commands.build import warn
from deploykit.devices import GPU_SPEC_HELP
from deploykit.ports import BRIDGE_HTTP_PORT, ENGINE_PORT, MQTT_PORT
from deploykit.serve import host
from deploykit.serve.plan import ServeRequest, describe, plan_serve
from deploykit.serve.processes import Supervisor

_err = Console(stderr=True, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("serve")
    def serve_cmd(
        quant: str = options.quant_option(extra=" Which runs on which GPU: `deploykit matrix`."),
        model: str = typer.Option(
            ...,
            "--model",
            help="A local checkpoint folder (or a Hugging Face id, which vLLM downloads).",
            show_default=False,
        ),
        gpus: str | None = typer.Option(
            None,
            "--gpus",
            help=GPU_SPEC_HELP + " Default: GPU 0, or the cpu cell when there is no GPU.",
        ),
        gpu_class: str | None = options.gpu_class_option(
            " Default: the class of the pinned GPUs; needed only where NVML cannot tell."
        ),
        projects: str = typer.Option(
            "general", "--projects", help="Comma-separated projects (one MQTT account each)."
        ),
        broker: str | None = typer.Option(
            None,
            "--broker",
            help="An existing broker, mqtt://HOST:PORT or mqtts://HOST:PORT, instead of starting "
            "this host's Mosquitto (needs --mqtt-username-file and --mqtt-password-file).",
        ),
        mqtt_username_file: Path | None = typer.Option(
            None, "--mqtt-username-file", help="With --broker: the bridge's username, in a file."
        ),
        mqtt_password_file: Path | None = typer.Option(
            None, "--mqtt-password-file", help="With --broker: the bridge's password, in a file."
        ),
        vllm_python: str | None = typer.Option(
            None,
            "--vllm-python",
            help="The python of the environment with vLLM. Default: the one running deploykit.",
        ),
        mqtt_port: int = typer.Option(MQTT_PORT, "--mqtt-port", help="Port of serve's broker."),
        engine_port: int = typer.Option(
            ENGINE_PORT, "--engine-port", help="vLLM's port (on 127.0.0.1 only)."
        ),
        bridge_port: int = typer.Option(
            BRIDGE_HTTP_PORT,
            "--bridge-port",
            help="The bridge's /health and /metrics (on 127.0.0.1 only).",
        ),
        logs: Path | None = typer.Option(
            None, "--logs", help="Folder of the processes' logs. Default: the instance's logs/."
        ),
        name: str | None = typer.Option(
            None,
            "--name",
            "-n",
            help="Instance name (health, chat: --name). Default: this checkout's, with -serve.",
            show_default=False,
        ),
        state_dir: Path = options.state_dir_option(),
        max_model_len: str | None = options.max_model_len_option(),
        gpu_memory_utilization: float | None = options.gpu_memory_utilization_option(),
        kv_cache_dtype: str | None = options.kv_cache_dtype_option(),
        reasoning_parser: str | None = options.reasoning_parser_option(),
        bridge_config: Path | None = options.bridge_config_option(),
        force: bool = options.force_option(
            "Start even when the pre-flight gate refuses (GPU, driver, checkpoint, memory)."
        ),
        timeout: float = typer.Option(
            1800.0, "--timeout", help="Seconds vLLM may take to load the model."
        ),
        grace: float = typer.Option(
            30.0, "--grace", help="Seconds each process may take to stop before SIGKILL."
        ),
    ) -> None:
        """Serve one cell as local processes, without Docker: this host's Mosquitto (or an
        existing broker), vLLM from a Python environment, and the bridge, in the foreground.

        Ctrl-C or SIGTERM stops everything it started; when one process ends, it stops the rest
        and exits non-zero. `deploykit health --name N` and `chat --name N` work against it.
        """
        request = ServeRequest(
            model=model,
            quant=quant,
            gpus=gpus,
            gpu_class=gpu_class,
            projects=tuple(p.strip() for p in projects.split(",") if p.strip()),
            broker=broker,
            mqtt_username_file=mqtt_username_file,
            mqtt_password_file=mqtt_password_file,
            name=name,
            state_dir=state_dir,
            logs_dir=logs,
            mqtt_port=mqtt_port,
            engine_port=engine_port,
            bridge_port=bridge_port,
            max_model_len=plan.parse_length(max_model_len) if max_model_len else None,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_dtype=kv_cache_dtype,
            reasoning_parser=reasoning_parser,
            bridge_config=bridge_config,
            force=force,
        )
        python = vllm_python or sys.executable
        planned = plan_serve(request, vllm_python=python, warn=warn)
        host.check_not_running(planned.name, planned.folder)
        host.check_ports_free(planned.ports())
        _err.print(f"checking the vLLM of {python}", markup=False)
        version = host.vllm_version(python)
        problem = matrix.vllm_version_warning(version)
        if problem:
            warn(problem)
        else:
            _err.print(f"vLLM {version}", markup=False)
        for key, value in describe(planned).items():
            _err.print(f"  {key + ':':<10}{value}", markup=False)
        _err.print(
            f"health: {options.program()} health --name {planned.name}"
            + ("" if state_dir == stack.DEFAULT_STATE_DIR else f" --state-dir {state_dir}"),
            markup=False,
        )
        run = host.ServeRun(
            planned,
            version,
            Supervisor(grace_s=grace),
            say=lambda line: _err.print(line, markup=False),
            start_timeout_s=timeout,
        )
        raise typer.Exit(run.run())
