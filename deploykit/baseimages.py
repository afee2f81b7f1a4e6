"""Local base images for machines that cannot pull (air-gapped sites, this CI).

The official images stay the default. When an image's default base is neither present nor
pullable, ``deploykit build`` builds the stand-in of its kind (``ImageSpec.base_kind``, from
``deploykit.render``) from Debian packages and says so:

- ``deploykit/base-python:bookworm``: ``debootstrap --variant=minbase`` of Debian bookworm with
  python3, python3-venv and ca-certificates, imported with ``docker import``;
- ``deploykit/base-mosquitto:bookworm``: that base plus Debian's ``mosquitto`` package (apt in a
  throwaway container, then ``docker commit``).

``deploykit base-images`` builds both on purpose. Needs root (debootstrap) and a Debian mirror.
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

from deploykit.docker import Docker
from deploykit.errors import DeployKitError, DockerError
from deploykit.matrix import BaseKind
from deploykit.ports import MQTT_PORT

ProgressFn = Callable[[str], None]

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
PYTHON_BASE = f"deploykit/base-python:{SUITE}"
MOSQUITTO_BASE = f"deploykit/base-mosquitto:{SUITE}"
PYTHON_PACKAGES = ("python3", "python3-venv", "ca-certificates")

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


LOCAL_BASE = {BaseKind.PYTHON: PYTHON_BASE, BaseKind.MOSQUITTO: MOSQUITTO_BASE}


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
) -> BaseImageResult:
    """Make sure the local base of ``kind`` exists, building it (and what it stands on) if not, or
    anew with ``rebuild``."""
    if kind is BaseKind.MOSQUITTO:
        ensure(docker, BaseKind.PYTHON, mirror=mirror, progress=progress)
    name = LOCAL_BASE[kind]
    if not rebuild and docker.image_exists(name):
        return BaseImageResult(name, built=False, seconds=0.0, size_bytes=docker.image_size(name))
    start = time.monotonic()
    if kind is BaseKind.PYTHON:
        _build_python_base(docker, mirror, progress)
    else:
        _build_mosquitto_base(docker, progress)
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
        for kind in (BaseKind.PYTHON, BaseKind.MOSQUITTO)
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


def _build_mosquitto_base(docker: Docker, progress: ProgressFn) -> None:
    progress(f"building {MOSQUITTO_BASE}: mosquitto from Debian on {PYTHON_BASE}")
    script = (
        "set -e; apt-get update -qq; "
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto mosquitto-clients; "
        "apt-get clean; rm -rf /var/lib/apt/lists/*"
    )
    docker.run_and_commit(
        PYTHON_BASE,
        ["sh", "-c", script],
        MOSQUITTO_BASE,
        [
            *_ENV_CHANGES,
            f"EXPOSE {MQTT_PORT}",
            'CMD ["/usr/sbin/mosquitto", "-c", "/etc/mosquitto/mosquitto.conf"]',
        ],
        progress=progress,
    )
