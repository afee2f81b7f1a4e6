"""Kubernetes manifests of a stack: plain manifests and a kustomization. Pure: data in, text out.

``deploykit render --k8s`` writes them; nothing here talks to a cluster. What they hold:

- the engine: a Deployment of ``replicas`` pods, each with ``gpus_per_replica`` GPUs
  (``nvidia.com/gpu`` limits, the tensor-parallel size), kept on nodes of the cell's GPU class by
  node affinity on the compute-capability labels of NVIDIA GPU Feature Discovery; its probes map the
  layered health checks: startup and liveness on ``/health`` (the port answers once the model is
  loaded), readiness a 1-token completion (ready only once the model answers);
- the bridge: a StatefulSet of as many pods as engines. A StatefulSet, not a Deployment, because a
  bridge's MQTT sessions are named after it: a restarted ``deploykit-bridge-1`` takes its session
  (and the requests the broker kept in it) back, where a Deployment's new pod name would leave the
  old session in the share group, receiving its share of requests until it expires;
- Redis (more than one replica): the session state replicas share, on a PersistentVolumeClaim;
- the broker (unless an external one is given): a StatefulSet with a PersistentVolumeClaim;
- NetworkPolicies: only the bridge reaches the engine and Redis;
- Secrets: a kustomize ``secretGenerator`` from the files of a ``secrets/`` folder beside the
  manifests, named as in the compose stack's secrets folder (``deploykit up`` makes one), so no
  secret value is ever in a rendered file.

Validated against the Kubernetes schemas (tests/unit/test_k8s.py); never applied to a cluster here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deploykit import __version__, names
from deploykit.errors import UsageError
from deploykit.matrix import CPU_DEMO_MODEL, GPU_CLASSES, Cell, GpuClass
from deploykit.ports import BRIDGE_HTTP_PORT, BROKER_HEALTH_PORT, ENGINE_PORT, MQTT_PORT, REDIS_PORT
from deploykit.render import (
    CPU_ENGINE_ENVIRONMENT,
    ENGINE_ENVIRONMENT,
    RUNTIME_UID,
    Bundle,
    StackOptions,
    engine_args,
    render_template,
    served_model_name,
)

#: The Kubernetes releases the manifests are validated against (the oldest and newest schemas the
#: kubernetes-validate package ships that the tests pin).
VALIDATED_VERSIONS = ("1.29.0", "1.37.0")
#: Node labels of NVIDIA GPU Feature Discovery (docs/facts.md, "Kubernetes").
CC_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
CC_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
GPU_RESOURCE = "nvidia.com/gpu"
#: How long the engine may take to download and load its model before Kubernetes restarts it.
STARTUP_SECONDS = {GpuClass.CPU: 600, GpuClass.CUDA: 1800, GpuClass.CUDA_FP8: 1800}
#: The files of the secrets folder each component reads (deploykit.secrets names them).
SECRET_FILES = {
    "engine": ("engine_api_key", "hf_token"),
    "bridge": (
        "mqtt_bridge_username",
        "mqtt_bridge_password",
        "bridge_client_id",
        "bridge_share_group",
        "engine_api_key",
        "redis_password",
    ),
    "broker": ("mqtt_users",),
    "redis": ("redis_password",),
}


@dataclass(frozen=True)
class K8sOptions:
    replicas: int = 1
    gpus_per_replica: int = 1  # the tensor-parallel size of each engine; ignored for cpu
    projects: tuple[str, ...] = ("general",)
    model: str | None = None  # a Hugging Face id; None: the cell's default (cpu: the demo model)
    max_model_len: int | None = None
    #: An external broker (mqtt[s]://HOST:PORT) the bridges join; None: a broker in the cluster.
    broker: str | None = None
    #: Where the images are pulled from: ``<registry>/engine:<tag>`` (CI pushes there).
    registry: str = "deploykit"
    image_version: str = __version__

    def __post_init__(self) -> None:
        names.check_project_names(self.projects)
        if self.replicas < 1 or self.gpus_per_replica < 1:
            raise UsageError(
                "--replicas and --tp must be at least 1", "e.g. --replicas 2 --tp 2: four GPUs"
            )


@dataclass(frozen=True)
class Term:
    """One nodeSelectorTerm: every expression must hold."""

    expressions: tuple[tuple[str, str, tuple[str, ...]], ...]  # (label, operator, values)


def compute_capability_terms(cls: GpuClass) -> list[Term]:
    """Node affinity terms (any may hold) for GPUs of compute capability in the class's range,
    from GPU Feature Discovery's major and minor labels. Empty for cpu."""
    spec = GPU_CLASSES[cls]
    if spec.min_cc is None:
        return []
    lo_major, lo_minor = _split(spec.min_cc)
    hi = None if spec.max_cc is None else _split(spec.max_cc)
    terms: list[Term] = []
    if hi is not None and hi[0] == lo_major:
        return [Term(((CC_MAJOR_LABEL, "In", (str(lo_major),)), *_minor(lo_minor, hi[1])))]
    terms.append(Term(((CC_MAJOR_LABEL, "In", (str(lo_major),)), *_minor(lo_minor, None))))
    if hi is None:
        terms.append(Term(((CC_MAJOR_LABEL, "Gt", (str(lo_major),)),)))
        return terms
    middle = tuple(str(m) for m in range(lo_major + 1, hi[0]))
    if middle:
        terms.append(Term(((CC_MAJOR_LABEL, "In", middle),)))
    if hi[1] > 0:
        terms.append(Term(((CC_MAJOR_LABEL, "In", (str(hi[0]),)), *_minor(0, hi[1]))))
    return terms


def _split(cc: float) -> tuple[int, int]:
    major = math.floor(cc)
    return major, round((cc - major) * 10)


def _minor(lo: int, hi: int | None) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """minor >= lo (and < hi): Kubernetes has Gt and Lt only."""
    out = []
    if lo > 0:
        out.append((CC_MINOR_LABEL, "Gt", (str(lo - 1),)))
    if hi is not None:
        out.append((CC_MINOR_LABEL, "Lt", (str(hi),)))
    return tuple(out)


def image(options: K8sOptions, name: str) -> str:
    return f"{options.registry}/{name}"


def render_k8s(cell: Cell, options: K8sOptions | None = None) -> Bundle:
    """The manifests of one supported cell, as files of one folder."""
    options = options or K8sOptions()
    if not cell.supported:
        raise UsageError(f"cell {cell.quant} x {cell.gpu_class} is not supported: {cell.reason}")
    cpu = cell.gpu_class is GpuClass.CPU
    if cpu and options.gpus_per_replica != 1:
        raise UsageError("--tp is for GPUs; the cpu class has none", "leave out --tp")
    stack = StackOptions(
        gpu_ids=tuple(str(i) for i in range(options.gpus_per_replica)),
        model=options.model,
        projects=options.projects,
        max_model_len=options.max_model_len,
        image_version=options.image_version,
    )
    shared = options.replicas > 1
    version = options.image_version
    components = ["engine", "bridge"] + (["redis"] if shared else [])
    if options.broker is None:
        components.append("broker")
    secrets = {
        c: [
            f
            for f in SECRET_FILES[c]
            if shared or f not in ("bridge_share_group", "redis_password")
        ]
        for c in components
    }
    context: dict[str, object] = {
        "cell": cell,
        "cpu": cpu,
        "options": options,
        "shared": shared,
        "deploykit_version": __version__,
        "engine_image": image(options, f"engine:{cell.quant}-{cell.gpu_class}-{version}"),
        "bridge_image": image(options, f"bridge:{version}"),
        "broker_image": image(options, f"broker:{version}"),
        "redis_image": image(options, f"redis:{version}"),
        "engine_command": engine_args(cell, stack),
        "engine_environment": {**ENGINE_ENVIRONMENT, **(CPU_ENGINE_ENVIRONMENT if cpu else {})},
        "served_model_name": served_model_name(cell, stack),
        "demo_model": CPU_DEMO_MODEL,
        "affinity_terms": compute_capability_terms(cell.gpu_class),
        "gpu_resource": GPU_RESOURCE,
        "startup_failures": STARTUP_SECONDS[cell.gpu_class] // 10,
        "projects": ",".join(options.projects),
        "broker_url": options.broker or f"mqtt://deploykit-broker:{MQTT_PORT}",
        "engine_port": ENGINE_PORT,
        "bridge_http_port": BRIDGE_HTTP_PORT,
        "mqtt_port": MQTT_PORT,
        "broker_health_port": BROKER_HEALTH_PORT,
        "redis_port": REDIS_PORT,
        "runtime_uid": RUNTIME_UID,
        "components": components,
        "secrets": secrets,
    }
    bundle = Bundle()
    files = ["kustomization.yaml", "engine.yaml", "bridge.yaml", "networkpolicy.yaml"]
    if shared:
        files.append("redis.yaml")
    if options.broker is None:
        files.append("broker.yaml")
    for name in sorted(files):
        bundle.add(name, render_template(f"k8s/{name}.j2", **context))
    return bundle
