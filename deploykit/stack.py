"""Run a stack: resolve GPUs and the cell, write its compose file, drive `docker compose`.

``docker compose`` (v2) is used when present, else ``docker-compose`` (v1). Each stack lives in a
state folder (``.deploykit/<name>`` of the checkout it was started from): the compose file rendered
for this run (GPU ids, tensor-parallel size, model, projects) and ``stack.json`` (what health and
chat need to find it), written only once the stack has started.

A stack's default name belongs to its checkout (:func:`default_name`), so two checkouts on one host
never share a compose project, its containers, volumes or secrets. ``deploykit.hoststacks`` finds
stacks on the host by name from any folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deploykit import matrix, mqttclient, render
from deploykit.errors import DockerError, GpuError, UnsupportedError, UsageError
from deploykit.matrix import Cell, GpuClass, Quant
from deploykit.plan import DEFAULT_GPU_MEMORY_UTILIZATION, gate
from deploykit.ports import MQTT_PORT, MQTT_TLS_PORT
from deploykit.secrets import WORKER_SECRETS, SecretsFolder, copy_private, copy_tls, ensure_secrets
from deploykit.serve.record import ServeState

DEFAULT_STATE_DIR = Path(".deploykit")
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
#: Set by both compose implementations: the compose file(s) a container was created from.
COMPOSE_CONFIG_FILES_LABEL = "com.docker.compose.project.config_files"
RECORD_FILE = "stack.json"
#: The broker image's entrypoint (templates/broker): builds Mosquitto's password file.
BROKER_ENTRYPOINT = "/opt/deploykit/entrypoint.sh"


# --- names ----------------------------------------------------------------------------------------

#: What Docker Compose accepts as a project name (lower-case letters, digits, '-' and '_').
_STACK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
STACK_NAME_RULE = (
    "a stack name is 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit "
    "(a Docker Compose project name)"
)


def check_stack_name(name: str) -> str:
    """Return ``name`` or raise ``UsageError`` saying what a stack name may be."""
    if not _STACK_NAME_RE.fullmatch(name):
        raise UsageError(f"--name {name!r} is not a valid stack name", STACK_NAME_RULE)
    return name


def default_name(state_dir: Path = DEFAULT_STATE_DIR) -> str:
    """This checkout's stack name: the name of the folder holding the state folder, and a short
    digest of the state folder's path (two checkouts of the same name still differ)."""
    where = state_dir.expanduser().resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", where.parent.name.lower()).strip("-")[:40] or "stack"
    digest = hashlib.sha256(str(where).encode()).hexdigest()[:6]
    return f"{slug}-{digest}"


# --- compose binary -------------------------------------------------------------------------------


def compose_command() -> list[str]:
    """``docker compose`` (v2) when it works, else ``docker-compose`` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerError(
        "neither `docker compose` (v2) nor `docker-compose` (v1) is installed",
        "install the Docker Compose plugin (apt-get install docker-compose-plugin) or docker-compose",
    )


# --- GPUs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedGpus:
    """What ``--gpus`` resolved to: the ids given to compose, and NVML facts when known."""

    device_ids: tuple[str, ...]
    compute_capability: float | None  # the lowest of the pinned GPUs; None without NVML
    names: tuple[str, ...] = ()
    gpus: tuple[Any, ...] = ()  # deploykit.devices.GpuInfo of each pinned GPU, when NVML is there


def host_inventory() -> Any | None:
    """The host's driver and GPUs (deploykit.devices.GpuInventory); None without NVML."""
    from deploykit import devices

    try:
        return devices.read_inventory()
    except GpuError:
        return None


def host_gpus() -> list[Any] | None:
    """The host's GPUs through deploykit.devices (NVML); None when NVML is not available."""
    inventory = host_inventory()
    return list(inventory.gpus) if inventory is not None else None


def resolve_gpus(spec: str, inventory: Sequence[Any] | None = None) -> PinnedGpus:
    """``2`` (GPU index 2), ``0,1``, UUIDs, ``all``, ``count=N`` -> device ids to pin.

    With NVML, indices become UUIDs (pinning by UUID survives renumbering); without it, indices
    and UUIDs go to the NVIDIA runtime unchanged.
    """
    gpus = inventory if inventory is not None else host_gpus()
    if gpus:
        from deploykit import devices

        chosen = devices.resolve_gpu_spec(spec, list(gpus))
        return PinnedGpus(
            tuple(g.uuid for g in chosen),
            min(g.compute_capability for g in chosen),
            tuple(g.name for g in chosen),
            tuple(chosen),
        )
    items = [s.strip() for s in spec.split(",")]
    if not spec.strip() or any(not s for s in items):
        raise UsageError(f"--gpus {spec!r} is empty or has an empty item", "e.g. --gpus 0,1")
    for item in items:
        if not (item.isdigit() or item.upper().startswith(("GPU-", "MIG-"))):
            raise UsageError(
                f"--gpus {spec!r}: {item!r} needs NVML to resolve, and NVML is not available here",
                "give GPU indices (0,1) or UUIDs (GPU-…), or install the NVIDIA driver",
            )
    if len(set(items)) != len(items):
        raise UsageError(f"--gpus {spec!r} names a GPU twice", "name each GPU once")
    return PinnedGpus(tuple(items), None)


# --- planning -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackPlan:
    """A resolved ``up`` request: the cell, the render options and where the stack lives."""

    name: str
    cell: Cell
    options: render.StackOptions
    state_dir: Path
    #: The certificate and key of the broker's TLS listener, copied into the secrets folder by up.
    tls_files: tuple[Path, Path] | None = None
    #: A worker's bundle folder, whose secrets up copies into the secrets folder.
    worker_secrets: Path | None = None

    @property
    def folder(self) -> Path:
        return self.state_dir / self.name

    @property
    def compose_file(self) -> Path:
        return self.folder / "compose.yaml"

    @property
    def served_model_name(self) -> str:
        return render.served_model_name(self.cell, self.options)


@dataclass(frozen=True)
class UpRequest:
    """What ``deploykit up`` asks for, as given; :func:`plan_up` resolves it once into a plan."""

    quant: Quant | str = Quant.NONE
    gpus: str | None = None  # devices.GPU_SPEC_HELP; None: GPU 0, or the cpu stack without GPUs
    gpu_class: GpuClass | str | None = None  # None: the pinned GPUs' class
    model: str | None = None  # a Hub id or a local checkpoint folder; None: the cell's default
    projects: Sequence[str] = ("general",)
    name: str | None = None  # None: this checkout's default_name(state_dir)
    state_dir: Path = DEFAULT_STATE_DIR
    secrets_dir: Path | None = None  # None: <state_dir>/<name>/secrets
    mqtt_port: int = MQTT_PORT
    image_version: str | None = None
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None
    reasoning_parser: str | None = None
    bridge_config: Path | None = None
    #: A TLS listener for the broker: PEM certificate and key, and the host port to publish it on.
    mqtt_tls_cert: Path | None = None
    mqtt_tls_key: Path | None = None
    mqtt_tls_port: int = MQTT_TLS_PORT
    #: Go ahead although the pre-flight gate refuses (its refusals become warnings): ``--force``.
    force: bool = False
    #: Engine+bridge pairs (``--replicas``) and GPUs per engine (``--tp``): ``--gpus 0,1,2,3
    #: --tp 2`` is two replicas of two GPUs. None: from the other (one replica of every GPU).
    replicas: int | None = None
    tp: int | None = None
    #: Publish this stack's Redis on this host port, for worker hosts (``--redis-port``).
    redis_port: int | None = None
    #: A worker host (``--role worker``): no broker, its bridges join ``broker_url`` and share the
    #: sessions' state in ``redis_url``, with the secrets of the broker host's bundle folder.
    worker_name: str | None = None
    broker_url: str | None = None
    redis_url: str | None = None
    worker_secrets: Path | None = None


def plan_up(
    request: UpRequest,
    *,
    inventory: Sequence[Any] | None = None,
    driver: Any | None = None,
    warn: Callable[[str], None] = lambda message: None,
) -> StackPlan:
    """Resolve what ``deploykit up`` asks for, and run the pre-flight gate (deploykit.plan.gate).

    The method and the image's cell are resolved once, here. The gate refuses a method the pinned
    GPUs cannot run, a driver too old for the image, MIG, a local checkpoint that does not match the
    method, and a model that does not fit; ``request.force`` turns its refusals into warnings (given
    to ``warn``). ``inventory``/``driver`` default to this host's.
    """
    q = matrix.parse_quant(request.quant)
    tls = _tls_files(request)
    if inventory is None:
        host = host_inventory()
        inventory = list(host.gpus) if host is not None else []
        driver = driver if driver is not None else (host.driver if host is not None else None)
    cls, pinned = _image_class(request, inventory)
    cell = matrix.resolve_target(q, cls)  # the image; the GPUs themselves are the gate's
    replicas, tp = split_gpus(
        len(pinned.device_ids) if pinned is not None else 0, request.replicas, request.tp
    )
    model = request.model
    local_model = (
        Path(model).expanduser().resolve() if model and Path(model).expanduser().is_dir() else None
    )
    if model and local_model is None and looks_like_path(model):
        raise UsageError(
            f"--model {model}: the folder does not exist",
            "give a local checkpoint folder that exists, or a Hugging Face id (ORG/NAME)",
        )
    result = gate(
        cell,
        gpus=pinned.gpus if pinned is not None else (),
        driver=driver,
        model=local_model or model or (None if cls is GpuClass.CPU else cell.default_model),
        max_model_len=request.max_model_len,
        kv_cache_dtype=request.kv_cache_dtype,
        gpu_memory_utilization=request.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION,
        tensor_parallel_size=tp if pinned is not None else None,
        force=request.force,
    )
    bridge_config = request.bridge_config
    if bridge_config is not None:
        from deploykit.bridge.config import load_config

        bridge_config = bridge_config.expanduser().resolve()
        load_config(bridge_config)  # a bad file is refused now, not in a restarting container
    for message in result.warnings:
        warn(f"--force: going ahead although {message}")
    for note in result.notes:
        warn(note)
    name = check_stack_name(request.name) if request.name else default_name(request.state_dir)
    folder = (request.state_dir / name).resolve()
    secrets = (request.secrets_dir or folder / "secrets").resolve()
    options = render.StackOptions(
        gpu_ids=pinned.device_ids if pinned is not None else ("0",),
        # a local checkpoint folder is mounted read-only at /models/<its name>
        model=f"/models/{local_model.name}" if local_model else model,
        served_model_name=local_model.name if local_model else None,
        models_dir=str(local_model.parent) if local_model else None,
        max_model_len=request.max_model_len,
        gpu_memory_utilization=request.gpu_memory_utilization,
        kv_cache_dtype=request.kv_cache_dtype,
        reasoning_parser=request.reasoning_parser,
        bridge_config=str(bridge_config) if bridge_config else None,
        projects=tuple(request.projects),
        mqtt_port=request.mqtt_port,
        secrets_dir=str(secrets),
        image_version=request.image_version or render.StackOptions().image_version,
        mqtt_tls_port=request.mqtt_tls_port if tls else None,
        replicas=replicas,
        redis_port=request.redis_port,
        worker_name=request.worker_name,
        broker_url=request.broker_url,
        redis_url=request.redis_url,
        host_cpus=os.cpu_count() if cls is GpuClass.CPU and replicas > 1 else None,
    )
    if request.worker_name is not None and (tls or request.redis_port is not None):
        raise UsageError(
            "a worker host runs no broker and no Redis: --mqtt-tls-cert and --redis-port are "
            "for the broker host",
            "leave them out with --role worker",
        )
    return StackPlan(name, cell, options, request.state_dir.resolve(), tls, request.worker_secrets)


def split_gpus(gpus: int, replicas: int | None, tp: int | None) -> tuple[int, int]:
    """(replicas, GPUs per replica) from ``--replicas``/``--tp`` over ``gpus`` pinned GPUs (0: the
    cpu class, where each replica is one CPU engine)."""
    if replicas is not None and replicas < 1:
        raise UsageError(f"--replicas {replicas}: at least one", "e.g. --replicas 2")
    if tp is not None and tp < 1:
        raise UsageError(f"--tp {tp}: at least one GPU per engine", "e.g. --tp 2")
    if gpus == 0:
        if tp not in (None, 1):
            raise UsageError(f"--tp {tp} splits GPUs, and the cpu stack has none", "leave out --tp")
        return replicas or 1, 1
    if tp is not None:
        if gpus % tp:
            raise UsageError(
                f"{gpus} GPUs do not split into engines of --tp {tp}",
                f"pin a multiple of {tp} GPUs with --gpus, e.g. --gpus {','.join(map(str, range(2 * tp)))}",
            )
        if replicas is not None and replicas * tp != gpus:
            raise UsageError(
                f"--replicas {replicas} of --tp {tp} need {replicas * tp} GPUs; --gpus pins {gpus}",
                "leave out one of --replicas and --tp: the other follows from --gpus",
            )
        return gpus // tp, tp
    if replicas is not None:
        if gpus % replicas:
            raise UsageError(
                f"{gpus} GPUs do not split into {replicas} replicas",
                f"pin a multiple of {replicas} GPUs with --gpus",
            )
        return replicas, gpus // replicas
    return 1, gpus


def _tls_files(request: UpRequest) -> tuple[Path, Path] | None:
    """The TLS certificate and key, both given and readable, or neither."""
    cert, key = request.mqtt_tls_cert, request.mqtt_tls_key
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError(
            "a TLS listener needs both a certificate and its key",
            "pass --mqtt-tls-cert CERT.pem and --mqtt-tls-key KEY.pem",
        )
    for path, what in ((cert, "certificate"), (key, "key")):
        if not path.expanduser().is_file():
            raise UsageError(f"the TLS {what} {path} does not exist", "pass the PEM file's path")
    if request.mqtt_tls_port == request.mqtt_port:
        raise UsageError(
            f"--mqtt-tls-port {request.mqtt_tls_port} is the plain MQTT port too",
            "pick another port for TLS (8883 is usual)",
        )
    return cert.expanduser().resolve(), key.expanduser().resolve()


def unreadable_by_engine(folder: Path, uid: int = render.RUNTIME_UID) -> list[Path]:
    """What of a local checkpoint the engine's user (``uid``) cannot reach: files it neither owns
    nor may read as "others", folders it may not enter; the folder's parent (mounted at /models)
    included. Group permissions do not count: the image does not pin the user's group id."""
    out = []
    for path in (folder.parent, folder, *sorted(folder.rglob("*"))):
        info = path.stat()
        # read files, list and enter the checkpoint's folders, enter the mounted parent
        read = path != folder.parent
        enter = stat.S_ISDIR(info.st_mode)
        if info.st_uid == uid:
            need = (stat.S_IRUSR if read else 0) | (stat.S_IXUSR if enter else 0)
        else:
            need = (stat.S_IROTH if read else 0) | (stat.S_IXOTH if enter else 0)
        if info.st_mode & need != need:
            out.append(path)
    return out


def check_engine_can_read(plan: StackPlan) -> None:
    """Refuse a local checkpoint the engine's user cannot read, before anything starts (the engine
    would restart until ``up`` times out). Checked where a stack starts, not in :func:`plan_up`:
    plans are made for other machines too."""
    if plan.options.models_dir is None or plan.options.model is None:
        return
    folder = Path(plan.options.models_dir) / Path(plan.options.model).name
    bad = unreadable_by_engine(folder)
    if bad:
        info = bad[0].stat()
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UsageError(
            f"the engine runs as user {render.RUNTIME_UID}, which cannot read the checkpoint "
            f"{folder}: {bad[0]} (mode {stat.S_IMODE(info.st_mode):04o}, owner {info.st_uid})"
            f"{more}",
            f"make it readable by others: chmod -R a+rX {folder} (and a+x on {folder.parent})",
        )


def looks_like_path(model: str) -> bool:
    """A --model that can only be a local path (a Hugging Face id is ORG/NAME, never these)."""
    return model.startswith(("/", "./", "../", "~")) or model in (".", "..")


def _image_class(
    request: UpRequest, inventory: Sequence[Any]
) -> tuple[GpuClass, PinnedGpus | None]:
    """The GPU class of the image to run, and the GPUs it is pinned to (None for cpu)."""
    gpu_class = matrix.parse_gpu_class(request.gpu_class) if request.gpu_class else None
    if gpu_class is GpuClass.CPU:
        return GpuClass.CPU, None
    if request.gpus is not None:
        pinned = resolve_gpus(request.gpus, inventory)
        if pinned.compute_capability is not None:
            cls = matrix.gpu_class_for(pinned.compute_capability)
            if gpu_class is not None and gpu_class != cls:
                raise UnsupportedError(
                    f"--gpu-class {gpu_class} was asked for, but the pinned GPUs "
                    f"({', '.join(pinned.names)}) are of class {cls}",
                    f"leave out --gpu-class, or pass --gpu-class {cls}",
                )
            return cls, pinned
        if gpu_class is None:
            raise GpuError(
                f"--gpus {request.gpus}: NVML is not available, so the GPUs' class is unknown "
                "(is there an NVIDIA GPU and driver here? `deploykit gpus` checks)",
                "on a machine without a GPU leave out --gpus (make: GPU=) for the cpu stack; "
                "where NVML is missing but the GPUs are there, name their class: --gpu-class "
                "cuda-fp8 (compute capability >= 8.9) or --gpu-class cuda (make: GPU_CLASS=cuda-fp8)",
            )
        return gpu_class, pinned
    if inventory:
        # GPUs found but none named: the first one (by NVML index), tensor parallel 1.
        pinned = resolve_gpus("0", inventory)
        return matrix.gpu_class_for(pinned.compute_capability or 0.0), pinned
    if gpu_class is not None:
        raise GpuError(
            f"--gpu-class {gpu_class} needs GPUs, and none were found (NVML not available)",
            "pass --gpus with GPU indices or UUIDs, or run the cpu stack (leave out --gpu-class)",
        )
    return GpuClass.CPU, None


def write_compose(plan: StackPlan) -> Path:
    """Render the compose file for this plan into the stack's folder; returns the compose file."""
    plan.folder.mkdir(parents=True, exist_ok=True)
    plan.compose_file.write_text(render.render_compose(plan.cell, plan.options))
    return plan.compose_file


def record_stack(plan: StackPlan, serve: ServeState | None = None) -> Path:
    """Record a started stack (``stack.json``), as health, chat, ps, logs and down find it; a
    ``deploykit serve`` instance adds its processes, engine URL and broker (``serve``)."""
    record: dict[str, Any] = {
        "name": plan.name,
        "quant": str(plan.cell.quant),
        "gpu_class": str(plan.cell.gpu_class),
        "served_model_name": plan.served_model_name,
        "options": {
            k: list(v) if isinstance(v, tuple) else v for k, v in asdict(plan.options).items()
        },
    }
    if serve is not None:
        record["kind"] = "serve"
        record["serve"] = serve.to_json()
    path = plan.folder / RECORD_FILE
    tmp = path.with_name(f".{RECORD_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)  # readers never see half a record
    return path


@dataclass(frozen=True)
class StackRecord:
    """A stack written by ``up``, as health, chat, ps, logs and down find it."""

    name: str
    folder: Path
    quant: str
    gpu_class: str
    served_model_name: str
    projects: tuple[str, ...]
    mqtt_port: int
    secrets_dir: Path
    bridge_name: str
    gpu_ids: tuple[str, ...] = ()  # the pinned GPUs (none for the cpu stack)
    #: Local processes of ``deploykit serve`` instead of containers (None: a compose stack).
    serve: ServeState | None = None
    bridge_config: Path | None = None  # the host file given to ``up --bridge-config``
    replicas: int = 1  # engine+bridge pairs
    redis_port: int | None = None  # its Redis published for worker hosts
    worker_name: str | None = None  # a worker host: no broker of its own
    broker_url: str | None = None  # a worker host's broker

    def check_has_broker(self, what: str) -> None:
        """Refuse ``what`` (something that needs this stack's own broker) on a worker host."""
        if self.worker_name is not None:
            raise UsageError(
                f"the stack {self.name!r} is the worker host {self.worker_name!r} of the broker "
                f"at {self.broker_url}: it has no broker of its own, so {what} is not here",
                "run it on the broker host (deploykit ... --name THAT-STACK there)",
            )

    def replica_pairs(self) -> list[render.Replica]:
        """The stack's engine+bridge pairs (their compose services and bridge names)."""
        return render.replicas_of(
            render.StackOptions(
                gpu_ids=self.gpu_ids or ("0",) * self.replicas,
                replicas=self.replicas,
                bridge_name=self.bridge_name,
                worker_name=self.worker_name,
            )
        )

    @property
    def compose_file(self) -> Path:
        return self.folder / "compose.yaml"

    def broker_address(self, host: str = "127.0.0.1") -> mqttclient.BrokerAddress:
        """Where clients of this stack reach its broker (a compose stack's: on ``host``)."""
        if self.serve is not None:
            return mqttclient.parse_broker_url(self.serve.broker_url)
        return mqttclient.BrokerAddress(host, self.mqtt_port)

    def client_credentials(self, project: str) -> mqttclient.Credentials:
        """The account the kit's own clients (health, chat) use for ``project``: the project's, or
        on a broker ``deploykit serve`` did not start, the account serve was given for it."""
        serve = self.serve
        if serve is not None and not serve.local_broker:
            found = mqttclient.read_credentials(serve.mqtt_username_file, serve.mqtt_password_file)
            if found is not None:
                return found
        password = SecretsFolder(self.secrets_dir).client_password(project)
        return mqttclient.Credentials(project, password)


def load_stack(name: str, state_dir: Path = DEFAULT_STATE_DIR) -> StackRecord:
    """The stack recorded in ``state_dir/name``; ``deploykit.hoststacks.find_stack`` also finds
    stacks of other checkouts by name."""
    return load_record((state_dir / name).resolve())


def load_record(folder: Path) -> StackRecord:
    """The stack recorded in one stack folder (its ``stack.json``)."""
    try:
        data = json.loads((folder / RECORD_FILE).read_text())
    except FileNotFoundError as exc:
        raise UsageError(
            f"no stack is recorded in {folder}",
            "start one with `deploykit up`, or see the stacks on this host: deploykit ls",
        ) from exc
    opts = data["options"]
    return StackRecord(
        name=data["name"],
        folder=folder,
        quant=data["quant"],
        gpu_class=data["gpu_class"],
        served_model_name=data["served_model_name"],
        projects=tuple(opts["projects"]),
        mqtt_port=int(opts["mqtt_port"]),
        secrets_dir=Path(opts["secrets_dir"]),
        bridge_name=opts.get("bridge_name") or opts.get("client_id", "bridge-1"),
        gpu_ids=() if data["gpu_class"] == "cpu" else tuple(opts.get("gpu_ids", ())),
        serve=ServeState.from_json(data["serve"]) if data.get("serve") else None,
        bridge_config=Path(opts["bridge_config"]) if opts.get("bridge_config") else None,
        replicas=int(opts.get("replicas", 1)),
        redis_port=opts.get("redis_port"),
        worker_name=opts.get("worker_name"),
        broker_url=opts.get("broker_url"),
    )


# --- compose verbs --------------------------------------------------------------------------------


def compose(
    name: str, compose_file: Path, args: Sequence[str], *, capture: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run one compose command for this stack; DockerError when it fails."""
    cmd = [*compose_command(), "-p", name, "-f", str(compose_file), *args]
    proc = subprocess.run(cmd, capture_output=capture, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:] if capture else ""
        low = detail.lower()
        if "could not select device driver" in low:
            raise DockerError(
                f"`{' '.join(args[:1])}` failed: Docker cannot give GPUs to containers",
                "install the NVIDIA Container Toolkit and restart dockerd, or run the cpu stack",
            )
        if "cannot connect" in low or "connection refused" in low:
            raise DockerError("the Docker daemon is not reachable", "start dockerd and retry")
        raise DockerError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}){': ' + detail if detail else ''}",
            f"see `deploykit logs --name {name}` and `deploykit ps --name {name}`",
        )
    return proc


def up(plan: StackPlan, *, start: bool = True, services: Sequence[str] = ()) -> Path:
    """Generate missing secrets, write the compose file, create (and start) the stack, and record
    it once it started; a failed ``up`` removes what it started and records nothing.

    On a running stack the broker keeps running (compose recreates only what changed), so it is
    told to load the accounts of projects added since it started (:func:`reload_accounts`).
    ``start=False`` creates the containers without starting them (``up --no-start``).
    """
    if plan.worker_secrets is not None:
        secrets = Path(plan.options.secrets_dir)
        copy_private([(plan.worker_secrets / n, secrets / n) for n in WORKER_SECRETS])
    folder = ensure_secrets(Path(plan.options.secrets_dir), plan.options.projects)
    if plan.tls_files is not None:
        copy_tls(folder, *plan.tls_files)
    existed = (plan.folder / RECORD_FILE).is_file()
    compose_file = write_compose(plan)
    broker_before = _running_broker(plan.name) if start else None
    args = ["up", "-d", "--remove-orphans"] if start else ["up", "--no-start"]
    try:
        compose(plan.name, compose_file, [*args, *services], capture=True)
    except DockerError as err:
        diagnosis = _diagnose(plan.name, compose_file)
        # Leave nothing half-started behind; a stack that was up before keeps its broker's data.
        down_args = ["down", "--remove-orphans"] + ([] if existed else ["--volumes"])
        with contextlib.suppress(DockerError):
            compose(plan.name, compose_file, down_args, capture=True)
        forget_stack(plan.folder)
        low = err.message.lower()
        if "address already in use" in low or "port is already allocated" in low:
            port = plan.options.mqtt_port
            raise DockerError(
                f"the host port {port} for MQTT is already in use, so the broker could not start "
                "(the partly started stack was removed again)",
                f"stop what listens there (`ss -ltnp 'sport = :{port}'`), or pick another port "
                "with --mqtt-port",
            ) from err
        raise DockerError(
            f"{err.message}\n{diagnosis}\n(the partly started stack was removed again)", err.hint
        ) from err
    record_stack(plan)
    if broker_before is not None and broker_before == _running_broker(plan.name):
        reload_accounts(plan.name, broker_before)
    return compose_file


def forget_stack(folder: Path) -> None:
    """Remove a stack's record and compose file (its secrets stay, so passwords stay stable)."""
    for name in (RECORD_FILE, "compose.yaml"):
        (folder / name).unlink(missing_ok=True)


def _running_broker(name: str) -> str | None:
    """The id of the stack's running broker container, if there is one."""
    from deploykit.docker import Docker

    found = Docker.connect().containers(
        {COMPOSE_PROJECT_LABEL: name, COMPOSE_SERVICE_LABEL: "broker"}
    )
    running = [c for c in found if c.status == "running"]
    return running[0].id if running else None


def reload_accounts(name: str, broker: str) -> None:
    """Make a running broker load the accounts file as it is now: its entrypoint rebuilds the
    password file from the ``mqtt_users`` secret (which ``ensure_secrets`` rewrites in place, so
    the running container sees it), then SIGHUP makes Mosquitto re-read it and the ACL."""
    from deploykit.docker import Docker

    docker = Docker.connect()
    code, output = docker.exec(broker, [BROKER_ENTRYPOINT, "--reload-accounts"])
    if code != 0:
        raise DockerError(
            f"the broker of stack {name!r} could not load the new accounts: {output.strip()[-500:]}",
            f"restart the stack: deploykit down --keep-data --name {name}, then deploykit up",
        )
    docker.signal(broker, "SIGHUP")


def _diagnose(name: str, compose_file: Path) -> str:
    """What a failed ``up`` leaves behind: container states and the engine's last log lines."""
    parts = []
    for args in (["ps"], ["logs", "--no-color", "--tail=25", "engine"]):
        try:
            out = compose(name, compose_file, args, capture=True).stdout
        except DockerError:
            continue
        parts.append(out.rstrip())
    return "\n".join(parts)


def down(record: StackRecord, *, keep_data: bool = False) -> None:
    """Stop and remove the stack's containers and networks (and volumes unless keep_data)."""
    args = ["down", "--remove-orphans"] + ([] if keep_data else ["--volumes"])
    compose(record.name, record.compose_file, args, capture=True)


def logs(
    record: StackRecord, services: Sequence[str] = (), *, follow: bool = False, tail: str = "200"
) -> None:
    args = ["logs", "--no-color", f"--tail={tail}"] + (["--follow"] if follow else [])
    compose(record.name, record.compose_file, [*args, *services])
