"""The prompts a benchmark or a comparison sends: a file (``--prompts FILE``) or the small set
that ships with the kit (``prompts.txt`` beside this module)."""

from __future__ import annotations

import json
from pathlib import Path

from deploykit.errors import UsageError

DEFAULT = Path(__file__).with_name("prompts.txt")
FORMAT = (
    "a text file with one prompt per line (blank lines and lines starting with # are skipped), "
    'or a .jsonl file with one JSON string or {"prompt": ...} object per line'
)


def parse(text: str, jsonl: bool = False) -> tuple[str, ...]:
    """Prompts from a file's text (pure)."""
    out = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if jsonl:
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"line {number} is not JSON: {err.msg}", f"use {FORMAT}") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt.strip():
                raise UsageError(f"line {number} holds no prompt", f"use {FORMAT}")
            out.append(prompt)
        else:
            out.append(line)
    return tuple(out)


def load(path: Path | None) -> tuple[tuple[str, ...], str]:
    """The prompts and where they came from (for the results)."""
    source = path or DEFAULT
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(
            f"cannot read the prompts file {source}: {err}", f"pass {FORMAT}"
        ) from None
    try:
        prompts = parse(text, jsonl=source.suffix == ".jsonl")
    except UsageError as err:
        raise UsageError(f"{source}: {err.message}", err.hint) from None
    if not prompts:
        raise UsageError(f"the prompts file {source} holds no prompt", f"pass {FORMAT}")
    return prompts, "the kit's default prompts" if path is None else str(path)
