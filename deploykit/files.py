"""Rendered files on disk: the one module that writes them (``deploykit render``, and the build
contexts of ``deploykit build``) and compares them with what is there (``deploykit render --check``)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from deploykit.render import RenderedFile

#: The folders ``deploykit render`` owns in the repository.
MANAGED_DIRS = ("images", "compose")


def write_files(files: Iterable[RenderedFile], root: Path) -> list[Path]:
    """Write the files under root, executable or not as rendered; returns the paths written."""
    written = []
    for f in files:
        path = root / f.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.text)
        path.chmod(0o755 if f.executable else 0o644)
        written.append(path)
    return written


def prune_stale(
    files: Iterable[RenderedFile], root: Path, managed: tuple[str, ...] = MANAGED_DIRS
) -> list[Path]:
    """Delete files under the managed folders that the templates no longer produce."""
    expected = {str(f.path) for f in files}
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


def check_files(
    files: Iterable[RenderedFile], root: Path, managed: tuple[str, ...] = MANAGED_DIRS
) -> list[str]:
    """Paths (relative to root) that differ from the files: changed, missing, or not rendered."""
    expected = {str(f.path): f for f in files}
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
