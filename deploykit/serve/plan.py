"""A ``deploykit serve`` request, resolved once into what to start.

The cell, the GPUs and the pre-flight gate come from ``deploykit.stack.plan_up`` (the same checks as
``up``); the engine's arguments from ``render.engine_args`` and the cell's own flags as the engine
image's start-up guard decides them (``deploykit.guard``); the bridge's and the engine's environment
from ``render``, as the compose stack has them. Pure but for what ``plan_up`` and the guard read (the
GPUs through NVML, a local checkpoint's config).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from deploykit import matrix, mqttclient, render, stack
from deploykit.bridge.config import load_config
from deploykit.bridge.pacing import engine_floor
from deploykit.errors import UsageError
from deploykit.guard import Guard
from deploykit.matrix import Cell, GpuClass, Quant
from deploykit.ports import BRIDGE_HTTP_PORT, ENGINE_PORT, MQTT_PORT
from deploykit.secrets import SecretsFolder

#: vLLM's OpenAI server, as a module of the Python that has vLLM.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: The engine and the bridge's HTTP listen on loopback only: the bridge is the way in.
LOOPBACK = "127.0.0.1"
PROCESS_NAMES = ("broker", "engine", "bridge")


@dataclass(frozen=True)
class ServeRequest:
    """What ``deploykit serve`` asks for, as given."""

    model: str
    quant: Quant | str = Quant.NONE
    gpus: str | None = None  # devices.GPU_SPEC_HELP; None: GPU 0, or the cpu cell without GPUs
    gpu_class: str | None = None
    projects: Sequence[str] = ("general",)
    #: An existing broker (mqtt[s]://HOST:PORT) and the account the bridge uses on it; None: a
    #: Mosquitto of this host, started by serve.
    broker: str | None = None
    mqtt_username_file: Path | None = None
    mqtt_password_file: Path | None = None
    vllm_python: Path | None = None  # None: the Python running deploykit
    name: str | None = None
    state_dir: Path = stack.DEFAULT_STATE_DIR
    logs_dir: Path | None = None  # None: <state folder>/logs
    mqtt_port: int = MQTT_PORT
    engine_port: int = ENGINE_PORT
    bridge_port: int = BRIDGE_HTTP_PORT
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    reasoning_parser: str | None = None
    bridge_config: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class ServePlan:
    """A resolved serve request: the stack plan ``up`` would have made, and the host's side."""

    stack: stack.StackPlan
    broker: mqttclient.BrokerAddress
    local_broker: bool
    engine_port: int
    bridge_port: int
    logs_dir: Path
    vllm_python: str
    #: the lowest compute capability of the pinned GPUs (None: cpu, or no NVML)
    compute_capability: float | None
    mqtt_username_file: Path | None = None
    mqtt_password_file: Path | None = None

    @property
    def name(self) -> str:
        return self.stack.name

    @property
    def cell(self) -> Cell:
        return self.stack.cell

    @property
    def folder(self) -> Path:
        return self.stack.folder

    @property
    def secrets(self) -> SecretsFolder:
        return SecretsFolder(Path(self.stack.options.secrets_dir))

    @property
    def broker_dir(self) -> Path:
        return self.folder / "broker"

    @property
    def gpu_ids(self) -> tuple[str, ...]:
        return () if self.cell.gpu_class is GpuClass.CPU else self.stack.options.gpu_ids

    @property
    def engine_url(self) -> str:
        return f"http://{LOOPBACK}:{self.engine_port}"

    @property
    def bridge_url(self) -> str:
        return f"http://{LOOPBACK}:{self.bridge_port}"

    def ports(self) -> dict[str, int]:
        """The ports serve's own processes listen on, by process."""
        ports = {"engine": self.engine_port, "bridge": self.bridge_port}
        if self.local_broker:
            ports["broker"] = self.broker.port
        return ports


def serve_name(request: ServeRequest) -> str:
    """The instance's name: ``--name``, else this checkout's stack name with ``-serve`` (so ``up``
    and ``serve`` of one checkout keep apart)."""
    if request.name:
        return stack.check_stack_name(request.name)
    return f"{stack.default_name(request.state_dir)}-serve"


def plan_serve(
    request: ServeRequest,
    *,
    vllm_python: str,
    inventory: Sequence[object] | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> ServePlan:
    """Resolve the request through ``up``'s planning and gate; refuses bad flags with what to do."""
    broker, local = _broker(request)
    up = stack.UpRequest(
        quant=request.quant,
        gpus=request.gpus,
        gpu_class=request.gpu_class,
        model=request.model,
        projects=tuple(request.projects),
        name=serve_name(request),
        state_dir=request.state_dir,
        mqtt_port=broker.port,
        max_model_len=request.max_model_len,
        gpu_memory_utilization=request.gpu_memory_utilization,
        kv_cache_dtype=request.kv_cache_dtype,
        reasoning_parser=request.reasoning_parser,
        bridge_config=request.bridge_config,
        force=request.force,
    )
    if inventory is None:
        host = stack.host_inventory()
        inventory = list(host.gpus) if host is not None else []
    # The gate's driver check is the engine image's CUDA; the given Python's vLLM brings its own.
    planned = stack.plan_up(up, inventory=inventory, driver=None, warn=warn)
    local_model = Path(request.model).expanduser()
    if local_model.is_dir():
        # up mounts a local checkpoint at /models/<name>; here vLLM reads it where it is
        options = replace(
            planned.options,
            model=str(local_model.resolve()),
            served_model_name=local_model.resolve().name,
            models_dir=None,
        )
        planned = replace(planned, options=options)
    cc = None
    if planned.cell.gpu_class is not GpuClass.CPU:
        pinned = stack.resolve_gpus(",".join(planned.options.gpu_ids), inventory)
        cc = pinned.compute_capability
    ports = [request.engine_port, request.bridge_port] + ([broker.port] if local else [])
    if len(set(ports)) != len(ports):
        raise UsageError(
            f"the MQTT, engine and bridge ports must differ (asked: {', '.join(map(str, ports))})",
            "pick distinct ports with --mqtt-port, --engine-port and --bridge-port",
        )
    folder = planned.folder
    return ServePlan(
        stack=planned,
        broker=broker,
        local_broker=local,
        engine_port=request.engine_port,
        bridge_port=request.bridge_port,
        logs_dir=(request.logs_dir or folder / "logs").expanduser().resolve(),
        vllm_python=vllm_python,
        compute_capability=cc,
        mqtt_username_file=_resolved(request.mqtt_username_file),
        mqtt_password_file=_resolved(request.mqtt_password_file),
    )


def _resolved(path: Path | None) -> Path | None:
    return path.expanduser().resolve() if path is not None else None


def _broker(request: ServeRequest) -> tuple[mqttclient.BrokerAddress, bool]:
    """The broker's address, and whether serve starts it; the bridge's account on an existing one."""
    files = (request.mqtt_username_file, request.mqtt_password_file)
    if request.broker is None:
        if any(f is not None for f in files):
            raise UsageError(
                "--mqtt-username-file/--mqtt-password-file are for an existing broker (--broker)",
                "leave them out: serve's own Mosquitto gets generated accounts",
            )
        return mqttclient.BrokerAddress(LOOPBACK, request.mqtt_port), True
    address = mqttclient.parse_broker_url(request.broker)
    if any(f is None for f in files):
        raise UsageError(
            f"--broker {request.broker}: the bridge needs an account on that broker",
            "pass --mqtt-username-file and --mqtt-password-file (files holding them, never the "
            "values on a command line)",
        )
    for path in files:
        assert path is not None
        if not path.expanduser().is_file():
            raise UsageError(f"the file {path} does not exist", "pass the file's path")
    return address, False


# --- the processes' commands and environments -----------------------------------------------------


def engine_command(plan: ServePlan, paced: Sequence[str] = ()) -> list[str]:
    """vLLM's command: the cell's flags as the start-up guard decides them (dtype below compute
    capability 8.0, on-the-fly flags dropped for a pre-quantized checkpoint), then the stack's,
    then ``paced`` (:func:`stream_interval_args` for the vLLM it runs)."""
    args = render.engine_args(plan.cell, plan.stack.options, host=LOOPBACK, port=plan.engine_port)
    guard = Guard(render.image_facts(plan.cell))
    fixed = list(guard.facts.vllm_args)
    if guard.facts.checks_gpus and plan.compute_capability is not None:
        fixed = guard.with_dtype(fixed, plan.compute_capability)
    fixed = guard.check_checkpoint(args, fixed)
    return [plan.vllm_python, "-m", VLLM_SERVER_MODULE, *fixed, *args, *paced]


def stream_interval_args(plan: ServePlan, vllm_version: str) -> list[str]:
    """The server-wide ``--stream-interval`` for a vLLM whose requests cannot carry their own
    (before matrix.VLLM_REQUEST_STREAM_INTERVAL): the least the bridge's ``engine_stream_tokens``
    asks for. Without it such a vLLM sends every token as its own event, and each event costs the
    bridge a wake-up: 6-9 ms of CPU per streamed 128-token answer on the H200 machine against
    2.6-3.9 ms at 4 tokens per event (benchmarks/RESULTS.md, "The bridge at GPU speed"). Nothing
    for a vLLM that takes the request's figure, an unreadable version, or a setting of 1."""
    if matrix.vllm_takes_request_stream_interval(vllm_version) is not False:
        return []
    config = plan.stack.options.bridge_config
    tokens = engine_floor(load_config(Path(config) if config else None).bridge.engine_stream_tokens)
    return ["--stream-interval", str(tokens)] if tokens > 1 else []


def engine_environment(plan: ServePlan, api_key: str) -> dict[str, str]:
    """What the engine gets beside the inherited environment: the stack's engine environment, the
    pinned GPUs by id, and the API key (vLLM reads ``VLLM_API_KEY``; never an argument)."""
    env = dict(render.ENGINE_ENVIRONMENT)
    if plan.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(plan.gpu_ids)
    env["VLLM_API_KEY"] = api_key
    return env


def bridge_environment(plan: ServePlan) -> dict[str, str]:
    """The bridge's ``DEPLOYKIT_*`` settings, as the compose stack sets them, with host paths."""
    secrets = plan.secrets.path
    config = plan.stack.options.bridge_config
    env = render.bridge_environment(
        plan.stack.options,
        broker=str(plan.broker),
        engine=plan.engine_url,
        http_port=plan.bridge_port,
        secret=lambda name: str(secrets / name),
        config=config,
    )
    if not plan.local_broker:
        assert plan.mqtt_username_file is not None and plan.mqtt_password_file is not None
        env["DEPLOYKIT_MQTT_USERNAME_FILE"] = str(plan.mqtt_username_file)
        env["DEPLOYKIT_MQTT_PASSWORD_FILE"] = str(plan.mqtt_password_file)
    env["DEPLOYKIT_HTTP_HOST"] = LOOPBACK
    return env


def broker_layout(plan: ServePlan, user: str) -> render.BrokerLayout:
    """The broker image's configuration in the instance's broker folder; Mosquitto started as root
    drops to ``user``, who owns the folder."""
    folder = plan.broker_dir
    return render.BrokerLayout(
        user=user,
        config_dir=str(folder / "conf"),
        auth_dir=str(folder / "auth"),
        data_dir=str(folder / "data"),
        health_port=None,
        tls_include=False,
    )


def broker_command(mosquitto: str, layout: render.BrokerLayout) -> list[str]:
    return [mosquitto, "-c", f"{layout.config_dir}/mosquitto.conf"]


def broker_accounts_command(layout: render.BrokerLayout) -> list[str]:
    """The broker image's entrypoint, building the password file and the ACL only."""
    return ["sh", f"{layout.config_dir}/entrypoint.sh", "--reload-accounts"]


def broker_accounts_environment(plan: ServePlan, layout: render.BrokerLayout) -> dict[str, str]:
    """Where the entrypoint finds the accounts and the ACL's shared part, and writes its files."""
    return {
        "DEPLOYKIT_MQTT_USERS_FILE": str(plan.secrets.users_file),
        "DEPLOYKIT_BROKER_AUTH_DIR": layout.auth_dir,
        "DEPLOYKIT_BROKER_SHARED_ACL": f"{layout.config_dir}/acl",
    }


def describe(plan: ServePlan) -> Mapping[str, str]:
    """What serve runs, in words (no secret)."""
    gpus = ",".join(plan.gpu_ids) or "none (cpu)"
    return {
        "cell": f"{plan.cell.quant} on {plan.cell.gpu_class}",
        "GPUs": gpus,
        "model": plan.stack.served_model_name,
        "projects": ",".join(plan.stack.options.projects),
        "broker": f"{plan.broker}" + ("" if plan.local_broker else " (existing)"),
        "engine": plan.engine_url,
        "logs": str(plan.logs_dir),
    }
