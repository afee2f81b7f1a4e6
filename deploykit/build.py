"""Build deploykit's images: engine (per cell), bridge and broker.

Each build context is assembled in a temporary folder from an image's rendered files
(``deploykit.render.ImageSpec``, written by ``deploykit.files``) plus wheels: those the image
installs, from ``--wheelhouse DIR`` or the host's cached wheelhouse (``deploykit.wheelhouses``), and
for the bridge a wheel of deploykit built here with its dependency wheels, so the image build
itself needs no network.
Nothing secret goes into a context: no CA bundle, no token; the Dockerfiles keep wheels in a build
stage only.

An image whose tag already exists with the same context digest (a label) is reused, not rebuilt.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploykit import __version__, baseimages, wheelhouses
from deploykit.docker import Docker
from deploykit.errors import DeployKitError, DockerError, UsageError
from deploykit.files import write_files
from deploykit.matrix import VLLM_VERSION, BaseKind
from deploykit.render import ImageSpec

ProgressFn = Callable[[str], None]

DIGEST_LABEL = "io.deploykit.context-digest"
BASE_LABEL = "io.deploykit.base-image"


@dataclass(frozen=True)
class Built:
    tag: str
    base_image: str
    seconds: float
    size_bytes: int
    reused: bool
    #: The base's size: ``size_bytes - base_size_bytes`` is what the image adds to it.
    base_size_bytes: int = 0


# --- wheels ---------------------------------------------------------------------------------------


def _source_root() -> Path | None:
    """The repository deploykit runs from, when it runs from a source checkout."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def deploykit_wheels(dest: Path, find_links: Path | None, progress: ProgressFn) -> None:
    """A wheel of deploykit built here plus its dependency wheels for the images' Python (3.11)."""
    root = _source_root()
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    if root is not None:
        progress("building a wheel of deploykit from the source tree")
        _run([*pip, "wheel", "--no-deps", "-w", str(dest), str(root)], "building deploykit's wheel")
        wheel = next(dest.glob("deploykit-*.whl"))
        target = str(wheel)
    else:
        target = f"deploykit=={__version__}"
    progress("collecting the bridge's dependency wheels (Python 3.11, manylinux)")
    machine = platform.machine()
    platforms = [
        f"manylinux_2_28_{machine}",
        f"manylinux_2_17_{machine}",
        f"manylinux2014_{machine}",
        "any",
    ]
    cmd = [
        *pip,
        "download",
        "-d",
        str(dest),
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
    ]
    for p in platforms:
        cmd += ["--platform", p]
    if find_links is not None:
        cmd += ["--find-links", str(find_links)]
    _run(
        [*cmd, target],
        "downloading the bridge's dependency wheels",
        hint="pass --wheelhouse DIR with the wheels of deploykit's dependencies for Python 3.11 "
        "(pip download there), or give this machine access to the package index",
    )


def _run(cmd: list[str], what: str, hint: str | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise DeployKitError(f"{what} failed: {(proc.stderr or proc.stdout)[-1500:]}", hint)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- contexts -------------------------------------------------------------------------------------


def assemble_context(
    image: ImageSpec,
    dest: Path,
    *,
    wheelhouse: Path | None,
    progress: ProgressFn,
    bridge_wheels: Path,
) -> Path:
    """Write the image's files into ``dest`` and put the wheels it needs into ``dest/wheelhouse``:
    the bridge's, or those of the image's own wheel set (``ImageSpec.wheels``) from ``wheelhouse``
    when it has them, else from this machine's cached wheelhouse of that set (downloaded once)."""
    write_files(image.files, dest)
    wheels = dest / "wheelhouse"
    wheels.mkdir(exist_ok=True)
    if image.needs_deploykit_wheel:
        if not bridge_wheels.is_dir():
            deploykit_wheels(bridge_wheels, wheelhouse, progress)
        for whl in sorted(bridge_wheels.glob("*.whl")):
            _link_or_copy(whl, wheels / whl.name)
    elif image.wheels is not None:
        source = wheelhouses.for_image(image.wheels, wheelhouse, progress)
        for whl in wheelhouses.select(source, image.wheels):
            _link_or_copy(whl, wheels / whl.name)
    return dest


def context_digest(context: Path, base_image_id: str) -> str:
    """A digest of everything a build depends on: its files (big wheels by name and size) and base."""
    h = hashlib.sha256(base_image_id.encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        rel = str(path.relative_to(context))
        h.update(rel.encode())
        if path.suffix == ".whl" and path.stat().st_size > 5_000_000:
            h.update(str(path.stat().st_size).encode())
        else:
            h.update(path.read_bytes())
        h.update(b"x" if os.access(path, os.X_OK) else b"-")
    return h.hexdigest()[:32]


def choose_base(
    docker: Docker,
    image: ImageSpec,
    override: str | None,
    progress: ProgressFn,
    *,
    wheelhouse: Path | None = None,
    bases: dict[str, baseimages.BaseImageResult] | None = None,
) -> str:
    """The base image to build on: the override, else the official default, else a local stand-in
    (built when missing; ``bases`` collects each local base used, by name)."""
    if override:
        if docker.image_exists(override) or docker.try_pull(override):
            return override
        raise DockerError(
            f"base image {override} is neither present nor pullable",
            "docker load it, or leave out --base-image to use the official one (or a local "
            "base when nothing can be pulled: deploykit base-images)",
        )
    default = image.default_base
    if docker.image_exists(default) or docker.try_pull(default):
        return default
    if image.base_kind is None:
        raise DockerError(
            f"base image {default} of {image.tag} is neither present nor pullable, and no local "
            "stand-in can be built for it",
            f"pull it where you have network (docker pull {default}; docker save | docker load "
            "here), or pass --base-image with an image that has it",
        )
    local = baseimages.LOCAL_BASE[image.base_kind]
    if bases is None or local not in bases:
        what = "vLLM base (PyPI wheels)" if image.base_kind is BaseKind.VLLM else "Debian base"
        progress(f"{default} is neither present nor pullable: using the local {what} {local}")
    if wheelhouse is not None and not wheelhouses.has(wheelhouse, (f"vllm=={VLLM_VERSION}",)):
        wheelhouse = None  # not the vLLM base's wheels (e.g. only the cpu image's): the cached ones
    result = baseimages.ensure(docker, image.base_kind, progress=progress, wheelhouse=wheelhouse)
    if bases is not None and (local not in bases or result.built):
        bases[local] = result
    return local


def build_images(
    docker: Docker,
    images: list[ImageSpec],
    *,
    base_image: str | None = None,
    wheelhouse: Path | None = None,
    rebuild: bool = False,
    progress: ProgressFn = print,
    bases: dict[str, baseimages.BaseImageResult] | None = None,
) -> list[Built]:
    """Build every image, reusing those whose context digest is unchanged unless ``rebuild``.
    Local stand-ins for unpullable bases are built first where missing; ``bases`` collects them."""
    if wheelhouse is not None and not wheelhouse.is_dir():
        raise UsageError(f"wheelhouse {wheelhouse} is not a folder", "pass a folder of .whl files")
    results = []
    with tempfile.TemporaryDirectory(prefix="deploykit-build-") as tmp:
        for n, image in enumerate(images, 1):
            # An engine's override applies to the engine; the broker needs a Mosquitto base.
            override = base_image if image.component != "broker" else None
            base = choose_base(
                docker, image, override, progress, wheelhouse=wheelhouse, bases=bases
            )
            start = time.monotonic()  # the image's own build, not its base's
            context = assemble_context(
                image,
                Path(tmp) / image.component / image.tag.replace("/", "_").replace(":", "_"),
                wheelhouse=wheelhouse,
                progress=progress,
                bridge_wheels=Path(tmp) / "bridge-wheels",
            )
            base_info = docker.image_info(base)
            base_size = int(base_info.get("Size", 0))
            digest = context_digest(context, str(base_info.get("Id", base)))
            step = f"[{n}/{len(images)}]"
            if (
                not rebuild
                and docker.image_exists(image.tag)
                and (docker.image_labels(image.tag).get(DIGEST_LABEL) == digest)
            ):
                progress(f"{step} {image.tag} is up to date (same context and base)")
                size = docker.image_size(image.tag)
                results.append(Built(image.tag, base, 0.0, size, True, base_size))
                continue
            previous = (
                str(docker.image_info(image.tag).get("Id"))
                if docker.image_exists(image.tag)
                else None
            )
            progress(f"{step} building {image.tag} on {base}")
            result = docker.build(
                context,
                image.tag,
                buildargs={"BASE_IMAGE": base},
                labels={DIGEST_LABEL: digest, BASE_LABEL: base},
                progress=progress,
                base_image=base,
            )
            if previous and previous != result.image_id:
                docker.remove_unused_image(previous)  # the image this build replaced
            seconds = time.monotonic() - start
            added = (result.size_bytes - base_size) / 1e9
            progress(
                f"{step} built {image.tag} in {seconds:.0f} s ({result.size_bytes / 1e9:.2f} GB, "
                f"{added:.2f} GB on its base)"
            )
            results.append(Built(image.tag, base, seconds, result.size_bytes, False, base_size))
    return results
