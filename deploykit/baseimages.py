"""Local base images for machines that cannot pull (air-gapped sites, this CI).

The official images stay the default. When an image's default base is neither present nor
pullable, ``deploykit build`` builds the stand-in of its kind (``ImageSpec.base_kind``, from
``deploykit.render``) and says so:

- ``deploykit/base-python:bookworm``: ``debootstrap --variant=minbase`` of Debian bookworm with
  python3, python3-venv and ca-certificates, imported with ``docker import``;
- ``deploykit/base-mosquitto:bookworm``: that base plus Debian's ``mosquitto`` package (apt in a
  throwaway container, then ``docker commit``);
- ``deploykit/base-vllm:<version>``: the Python base plus vLLM and its dependencies installed from
  a wheelhouse (``deploykit.wheelhouses``, mounted read-only, ``pip install --no-index``), laid out
  like the official ``vllm/vllm-openai`` image where the engine Dockerfile relies on it (system
  ``python3`` with pip, vLLM in ``/usr/local`` with the ``vllm`` command on PATH, HOME ``/root`` so the
  Hugging Face cache is ``/root/.cache/huggingface``, WORKDIR ``/vllm-workspace``, ENTRYPOINT
  ``vllm serve``, the NVIDIA runtime's variables). A stand-in, labelled as one: its CUDA libraries
  come from the PyPI wheels (torch's ``nvidia-*`` dependencies), not from NVIDIA's CUDA base image,
  and its Python is Debian's 3.11 where the official image has 3.12
  (docs/facts.md, "Where nothing can be pulled");
- ``deploykit/base-redis:bookworm``: the Python base plus Debian's ``redis-server`` (as the
  mosquitto base), for the session state that replicas share.

``deploykit base-images`` builds the python, mosquitto and redis bases on purpose, ``--vllm`` the
vLLM one. Needs root
(debootstrap) and a Debian mirror.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploykit import wheelhouses
from deploykit.docker import Docker
from deploykit.errors import DeployKitError, DockerError, UsageError
from deploykit.matrix import VLLM_IMAGE, VLLM_VERSION, BaseKind, WheelSet
from deploykit.ports import MQTT_PORT, REDIS_PORT

ProgressFn = Callable[[str], None]

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PYTHON_BASE = f"deploykit/base-python:{SUITE}"
MOSQUITTO_BASE = f"deploykit/base-mosquitto:{SUITE}"
REDIS_BASE = f"deploykit/base-redis:{SUITE}"
PYTHON_PACKAGES = ("python3", "python3-venv", "ca-certificates")
#: Debian packages the vLLM base adds (unpinned: the suite's own versions). pip: the engine
#: Dockerfile's extras stage runs ``python3 -m pip`` (the official image has pip); python3-dev, gcc,
#: g++: Triton compiles its CUDA launcher with the C compiler and Python's headers at first use, and
#: torch.compile and FlashInfer compile C++ (the official image has NVIDIA's CUDA devel toolchain).
VLLM_PACKAGES = ("python3-pip", "python3-dev", "gcc", "g++")
#: Where the wheelhouse is mounted (read-only) while vLLM is installed; never part of the image.
WHEELHOUSE_MOUNT = "/wheelhouse"

_ENV_CHANGES = [
    "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "ENV LANG=C.UTF-8",
    f"LABEL io.deploykit.base={SUITE}",
]
# Trimmed from the root filesystem before import: package caches and index files (apt update
# fetches them again when an image needs more packages), docs and translations.
_TRIM = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/locale",
    "usr/share/info",
)


def vllm_base(version: str = VLLM_VERSION) -> str:
    """The local vLLM base of this vLLM version: ``deploykit/base-vllm:0.33.0``."""
    return f"deploykit/base-vllm:{version}"


LOCAL_BASE = {
    BaseKind.PYTHON: PYTHON_BASE,
    BaseKind.MOSQUITTO: MOSQUITTO_BASE,
    BaseKind.REDIS: REDIS_BASE,
    BaseKind.VLLM: vllm_base(),
}


@dataclass(frozen=True)
class BaseImageResult:
    name: str
    built: bool  # False when it was already there
    seconds: float
    size_bytes: int


def ensure(
    docker: Docker,
    kind: BaseKind,
    *,
    rebuild: bool = False,
    mirror: str = DEFAULT_MIRROR,
    progress: ProgressFn = print,
    wheelhouse: Path | None = None,
    vllm_version: str = VLLM_VERSION,
) -> BaseImageResult:
    """Make sure the local base of ``kind`` exists, building it (and what it stands on) if not, or
    anew with ``rebuild``. The vLLM base installs ``vllm_version`` from ``wheelhouse`` (default: the
    cached one, downloaded first when there is none)."""
    if kind is not BaseKind.PYTHON:
        ensure(docker, BaseKind.PYTHON, mirror=mirror, progress=progress)
    name = vllm_base(vllm_version) if kind is BaseKind.VLLM else LOCAL_BASE[kind]
    if not rebuild and docker.image_exists(name):
        return BaseImageResult(name, built=False, seconds=0.0, size_bytes=docker.image_size(name))
    start = time.monotonic()
    if kind is BaseKind.PYTHON:
        _build_python_base(docker, mirror, progress)
    elif kind is BaseKind.MOSQUITTO:
        _build_mosquitto_base(docker, progress)
    elif kind is BaseKind.REDIS:
        _build_redis_base(docker, progress)
    else:
        if wheelhouse is None:
            wheelhouse = wheelhouses.ensure(WheelSet.VLLM_CUDA, progress, vllm_version)
        _build_vllm_base(docker, name, vllm_version, wheelhouse, progress)
    seconds = time.monotonic() - start
    progress(f"built {name} in {seconds:.0f} s")
    return BaseImageResult(name, built=True, seconds=seconds, size_bytes=docker.image_size(name))


def ensure_all(
    docker: Docker,
    *,
    rebuild: bool = False,
    mirror: str = DEFAULT_MIRROR,
    progress: ProgressFn = print,
) -> list[BaseImageResult]:
    return [
        ensure(docker, kind, rebuild=rebuild, mirror=mirror, progress=progress)
        for kind in (BaseKind.PYTHON, BaseKind.MOSQUITTO, BaseKind.REDIS)
    ]


def _debootstrap() -> str:
    path = shutil.which("debootstrap") or (
        "/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None
    )
    if path is None:
        raise DeployKitError(
            "debootstrap is not installed; it is needed to build a local base image",
            "apt-get install debootstrap (or pull/load the official base image and retry)",
        )
    if os.geteuid() != 0:
        raise DeployKitError(
            "building a local base image needs root (debootstrap creates device nodes and chroots)",
            "run `sudo deploykit base-images` once, or `docker load` the official base image",
        )
    return path


def _build_python_base(docker: Docker, mirror: str, progress: ProgressFn) -> None:
    debootstrap = _debootstrap()
    progress(f"building {PYTHON_BASE} with debootstrap from {mirror} (about a minute)")
    with tempfile.TemporaryDirectory(prefix="deploykit-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        cmd = [
            debootstrap,
            "--variant=minbase",
            f"--include={','.join(PYTHON_PACKAGES)}",
            SUITE,
            str(root),
            mirror,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DockerError(
                f"debootstrap failed (exit {proc.returncode}): {proc.stdout[-800:]}{proc.stderr[-800:]}",
                f"check that the Debian mirror {mirror} is reachable (--mirror picks another)",
            )
        for rel in _TRIM:
            target = root / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir(parents=True)
        tarball = Path(tmp) / "rootfs.tar"
        tar = subprocess.run(
            ["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."],
            capture_output=True,
            text=True,
            check=False,
        )
        if tar.returncode != 0:
            raise DeployKitError(f"packing the root filesystem failed: {tar.stderr[-800:]}")
        progress(f"importing {PYTHON_BASE}")
        docker.import_rootfs(tarball, PYTHON_BASE, [*_ENV_CHANGES, 'CMD ["python3"]'])


def _apt_script(packages: str) -> str:
    return (
        "set -e; apt-get update -qq; "
        f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {packages}; "
        "apt-get clean; rm -rf /var/lib/apt/lists/*"
    )


def _build_mosquitto_base(docker: Docker, progress: ProgressFn) -> None:
    progress(f"building {MOSQUITTO_BASE}: mosquitto from Debian on {PYTHON_BASE}")
    docker.run_and_commit(
        PYTHON_BASE,
        ["sh", "-c", _apt_script("mosquitto mosquitto-clients")],
        MOSQUITTO_BASE,
        [
            *_ENV_CHANGES,
            f"EXPOSE {MQTT_PORT}",
            'CMD ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]',
        ],
        progress=progress,
    )


def _vllm_install_script(version: str) -> str:
    """The shell script that turns the Python base into the vLLM base (wheels at WHEELHOUSE_MOUNT)."""
    site = "/usr/local/lib/python3*/dist-packages"
    return "; ".join(
        [
            "set -eu",
            "apt-get update -qq",
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "
            + " ".join(VLLM_PACKAGES)
            + " >/dev/null",
            "apt-get clean",
            "rm -rf /var/lib/apt/lists/*",
            # into /usr/local like the official image's `uv pip install --system`; --no-index: only
            # the mounted wheels, so no network and no CA bundle. Byte code is compiled in one go
            # afterwards, on every core (pip would compile file by file); a file that does not
            # compile (templates, other Pythons' syntax) is left to be compiled at import, as pip does.
            "echo installing vllm==" + version + " from the wheelhouse",
            "python3 -m pip install --no-cache-dir --disable-pip-version-check --break-system-packages"
            f" --no-compile --no-index --find-links {WHEELHOUSE_MOUNT} vllm=={version}",
            "echo compiling byte code",
            f"python3 -m compileall -q -j 0 {site} >/dev/null || true",
            "mkdir -p /vllm-workspace",
            # what the image really has, for its labels (read back by _installed)
            'python3 -c "import platform, torch, vllm; '
            "print('deploykit-base-vllm', vllm.__version__, torch.__version__, "
            'torch.version.cuda, platform.python_version())"',
        ]
    )


def _installed(log: list[str]) -> dict[str, str]:
    """vLLM, torch, CUDA and Python versions as the install script printed them."""
    for line in reversed(log):
        words = line.split()
        if len(words) == 5 and words[0] == "deploykit-base-vllm":
            return dict(zip(("vllm", "torch", "cuda", "python"), words[1:], strict=True))
    raise DeployKitError(
        "installing vLLM into the base printed no versions:\n" + "\n".join(log[-20:])
    )


def _build_vllm_base(
    docker: Docker, name: str, version: str, wheelhouse: Path, progress: ProgressFn
) -> None:
    absent = wheelhouses.missing(wheelhouse, WheelSet.VLLM_CUDA, version)[:1]
    if absent:
        raise UsageError(
            f"the wheelhouse {wheelhouse} has no wheel of {absent[0]}",
            f"make one with: deploykit wheelhouse --vllm-version {version} --dest DIR",
        )
    progress(
        f"building {name}: vLLM {version} from the wheelhouse {wheelhouse} on {PYTHON_BASE} "
        "(about 5 minutes)"
    )
    official = f"{VLLM_IMAGE}:v{version}"

    def changes(log: list[str]) -> list[str]:
        got = _installed(log)
        if got["vllm"] != version:
            raise DeployKitError(f"the wheelhouse installed vLLM {got['vllm']}, not {version}")
        progress(
            f"committing {name} (vLLM {got['vllm']}, torch {got['torch']}, CUDA {got['cuda']})"
        )
        return [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            # as NVIDIA's CUDA images (the official image's base) set them for the NVIDIA runtime
            "ENV NVIDIA_VISIBLE_DEVICES=all",
            "ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility",
            "WORKDIR /vllm-workspace",
            'ENTRYPOINT ["vllm", "serve"]',
            "CMD []",
            *(f'LABEL {k}="{v}"' for k, v in vllm_base_labels(official, got).items()),
        ]

    docker.run_and_commit(
        PYTHON_BASE,
        ["sh", "-c", _vllm_install_script(version)],
        name,
        changes,
        progress=progress,
        read_only_mounts={str(wheelhouse.resolve()): WHEELHOUSE_MOUNT},
    )


def vllm_base_labels(official: str, got: dict[str, str]) -> dict[str, str]:
    """What the vLLM base says it is: a stand-in for the official image, and what it holds."""
    return {
        "org.opencontainers.image.title": f"deploykit vLLM {got['vllm']} base (stand-in for {official})",
        "org.opencontainers.image.description": (
            f"vLLM {got['vllm']} installed from PyPI wheels on Debian {SUITE} (Python {got['python']}); "
            f"torch {got['torch']} with CUDA {got['cuda']} libraries from the nvidia-* wheels, not "
            "from NVIDIA's CUDA base image. Built by deploykit base-images --vllm where the official "
            "image cannot be pulled."
        ),
        "io.deploykit.base": "vllm",
        "io.deploykit.stand-in-for": official,
        "io.deploykit.vllm-version": got["vllm"],
        "io.deploykit.torch-version": got["torch"],
        "io.deploykit.cuda": got["cuda"],
        "io.deploykit.python": got["python"],
    }


def _build_redis_base(docker: Docker, progress: ProgressFn) -> None:
    progress(f"building {REDIS_BASE}: redis-server from Debian on {PYTHON_BASE}")
    docker.run_and_commit(
        PYTHON_BASE,
        ["sh", "-c", _apt_script("redis-server")],
        REDIS_BASE,
        [*_ENV_CHANGES, f"EXPOSE {REDIS_PORT}", 'CMD ["redis-server"]'],
        progress=progress,
    )
