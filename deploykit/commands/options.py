"""Options several commands share: declared once, so one flag name has one meaning everywhere.

- ``--name``/``--state-dir``: which stack (``deploykit.stack``: this checkout's by default, or any
  stack on the host by name);
- ``--rebuild``: rebuild images even when they are up to date (build, base-images, up);
- ``--force``: go ahead although the pre-flight gate refuses (build, up);
- ``--json``: print JSON instead of a table;
- ``--wheelhouse``: a folder of wheels that builds install from instead of the host's cached ones
  (build, base-images, up);
- ``--wait``/``--timeout``: wait until every health check passes, at most this long (up, health);
- ``--max-model-len``, ``--gpu-memory-utilization``, ``--kv-cache-dtype``, ``--reasoning-parser``,
  ``--bridge-config``: the engine's and the bridge's settings (up, serve);
- ``--model``, ``--gpus``, ``--mqtt-port``, ``--timeout`` of the stacks that ``bench --methods``
  and ``compare`` start for methods.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
from pathlib import Path
from typing import Any

import typer

from deploykit import hoststacks, matrix, stack
from deploykit.devices import GPU_SPEC_HELP
from deploykit.errors import UsageError

NAME_HELP = (
    "Stack name (its compose project). Default: this checkout's stack; "
    "any stack on this host by name (see `deploykit ls`)."
)
STATE_DIR_HELP = "Folder of this checkout's stacks (compose file, secrets)."

QUANT_HELP = "Quantization method: " + ", ".join(
    f"{q.value}" for q in matrix.Quant if not matrix.METHODS[q].removed
)
GPU_CLASS_HELP = "GPU class: " + "; ".join(
    f"{c.value} ({spec.examples})" for c, spec in matrix.GPU_CLASSES.items()
)


def name_option() -> Any:
    return typer.Option(None, "--name", "-n", help=NAME_HELP, show_default=False)


def state_dir_option() -> Any:
    return typer.Option(stack.DEFAULT_STATE_DIR, "--state-dir", help=STATE_DIR_HELP)


def json_option(what: str = "Print JSON.") -> Any:
    return typer.Option(False, "--json", help=what)


def rebuild_option(what: str = "images") -> Any:
    return typer.Option(False, "--rebuild", help=f"Rebuild the {what} even when up to date.")


def force_option(what: str) -> Any:
    return typer.Option(False, "--force", help=what)


def wait_option(what: str = "Wait until every health check passes (at most --timeout).") -> Any:
    return typer.Option(False, "--wait", help=what)


def timeout_option(default: float = 600.0) -> Any:
    return typer.Option(default, "--timeout", help="Seconds --wait waits at most.")


def wheelhouse_option(what: str) -> Any:
    return typer.Option(None, "--wheelhouse", help=what, show_default=False)


def quant_option(default: str | None = "none", extra: str = "") -> Any:
    return typer.Option(default, "--quant", "-q", help=f"{QUANT_HELP}.{extra}")


def gpu_class_option(extra: str = "") -> Any:
    return typer.Option(None, "--gpu-class", "-c", help=f"{GPU_CLASS_HELP}.{extra}")


# --- the stacks bench --methods and compare start for methods; ``when`` says when the option applies


def methods_model_option(when: str) -> Any:
    return typer.Option(
        None,
        "--model",
        help=f"{when}: one model for all (folder or Hub id), or one per method (none=DIR,awq=DIR; "
        "AWQ and GPTQ need their own pre-quantized checkpoints).",
        show_default=False,
    )


def methods_gpus_option(when: str) -> Any:
    return typer.Option(None, "--gpus", help=f"{when}: {GPU_SPEC_HELP}", show_default=False)


def methods_mqtt_port_option(when: str) -> Any:
    return typer.Option(
        None,
        "--mqtt-port",
        help=f"{when}: the stacks' MQTT port. Default: a free one from 18830.",
        show_default=False,
    )


def methods_timeout_option(when: str) -> Any:
    return typer.Option(
        900.0, "--timeout", help=f"{when}: seconds each method's stack may take to be healthy."
    )


def find(name: str | None, state_dir: Path) -> stack.StackRecord:
    """The stack a command acts on: ``--name`` anywhere on this host, else this checkout's."""
    return hoststacks.find_stack(name, state_dir)


def find_compose(name: str | None, state_dir: Path) -> stack.StackRecord:
    """The compose stack a command acts on; a ``deploykit serve`` instance is refused, saying how
    it is managed instead."""
    record = find(name, state_dir)
    if record.serve is not None:
        raise UsageError(
            f"{record.name!r} is a `deploykit serve` instance (pid {record.serve.supervisor_pid}), "
            "not a compose stack",
            f"stop it with Ctrl-C or `kill {record.serve.supervisor_pid}`; its logs are in "
            f"{record.serve.logs_dir}; `deploykit health --name {record.name}` checks it",
        )
    return record


def program() -> str:
    """How to type this program again: ``deploykit`` when that is on PATH, else its path."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "deploykit":
        on_path = shutil.which("deploykit")
        if on_path and Path(on_path).resolve() == argv0.resolve():
            return "deploykit"
        with contextlib.suppress(ValueError):
            return str(argv0.resolve().relative_to(Path.cwd().resolve()))
        return str(argv0)
    return f"{sys.executable} -m deploykit"


# --- the engine's and the bridge's settings: up and serve -----------------------------------------


def max_model_len_option() -> Any:
    return typer.Option(
        None, "--max-model-len", help="Context length (e.g. 8192, 32k); default: the model's."
    )


def gpu_memory_utilization_option() -> Any:
    return typer.Option(
        None, "--gpu-memory-utilization", help="Fraction of each GPU's memory for vLLM (0.92)."
    )


def kv_cache_dtype_option() -> Any:
    return typer.Option(
        None, "--kv-cache-dtype", help="auto, fp8 (halves KV memory), ... (default: the method's)."
    )


def reasoning_parser_option() -> Any:
    return typer.Option(
        None,
        "--reasoning-parser",
        help="vLLM reasoning parser for <think> models (e.g. deepseek_r1, qwen3).",
    )


def bridge_config_option() -> Any:
    return typer.Option(
        None,
        "--bridge-config",
        exists=True,
        dir_okay=False,
        help="YAML with per-project settings (system prompt, limits, overrides, rate limit).",
    )
