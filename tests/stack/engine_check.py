"""Checks that run inside a CUDA engine image on a machine without a GPU (tests/stack/test_cuda_images.py).

Run with the image's own Python: ``python3 engine_check.py CASES.json``. Standard library, plus what
the image carries: its start-up guard (/opt/deploykit) and its vLLM. For each case it prints one line
``ENGINE-CHECK {json}``:

- ``command`` cases: the engine's command as the image's guard builds it from the stack's arguments
  on a GPU of the given name and compute capability (the guard's own ``Guard.command``; only the
  GPUs it sees are given, since this machine has none), then that command run through the image's
  own ``vllm`` program: vLLM's CLI parses it and validates it as ``vllm serve`` does, its server
  start-up runs (API server checks, socket), and where the engine would be created vLLM builds its
  engine configuration (``AsyncEngineArgs.create_engine_config``: the model's config.json against
  --quantization, dtype, --max-model-len, KV cache, parallelism, scheduler). There the case ends: no
  engine is started. vLLM finds its CUDA platform only through the GPU driver's libcuda, which a
  machine without a GPU lacks, so vLLM runs on its CPU target (``VLLM_TARGET_DEVICE=cpu``, vLLM's own
  switch for running an accelerator wheel on CPU-only CI): what depends on the GPU itself (kernels
  per compute capability, attention backends, memory) is not checked here
  (docs/facts.md, "vLLM without a GPU").
- ``plugins`` cases: whether bitsandbytes imports, and which quantization methods vLLM knows once
  its plugins are loaded (vllm-bnb-plugin registers ``bitsandbytes``).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any

# Before vLLM is imported: its CPU target (see above), and no Hugging Face Hub (local folders only).
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
GUARD_DIR = "/opt/deploykit"
MARK = "ENGINE-CHECK "


class EngineWouldStart(Exception):
    """Raised where the vLLM server would create its engine, after its engine configuration."""


def report(**fields: Any) -> None:
    print(MARK + json.dumps(fields, sort_keys=True), flush=True)


def guard_command(gpu: tuple[str, float], args: list[str]) -> list[str]:
    """The command the image's guard starts on this GPU (it exits when it refuses)."""
    sys.path.insert(0, GUARD_DIR)
    import guard  # type: ignore[import-not-found]

    class SeesOneGpu(guard.Guard):  # type: ignore[misc]
        def visible_gpus(self) -> list[tuple[str, float]]:
            return [gpu]

    return list(SeesOneGpu(guard.load_facts()).command(args))


def vllm_program(name: str) -> Callable[[], object]:
    """The function the image's ``vllm`` program runs (its console-script entry point)."""
    scripts = importlib.metadata.entry_points(group="console_scripts")
    return next(e for e in scripts if e.name == name).load()  # type: ignore[no-any-return]


def stop_where_the_engine_starts() -> dict[str, Any]:
    """Let vLLM's server start-up run up to the engine: build the engine configuration there, as
    the server does first, then unwind. Returns what the configuration said."""
    from vllm.entrypoints.launchers.api_server import entry

    seen: dict[str, Any] = {"stage": "cli"}
    setup_server = entry.setup_server

    def setup_and_remember(*args: Any, **kwargs: Any) -> Any:
        seen["stage"] = "server setup"
        address, sock = setup_server(*args, **kwargs)
        seen["socket"] = sock  # closed after the case: the next one binds the same port
        seen["stage"] = "engine arguments"
        return address, sock

    @contextlib.asynccontextmanager
    async def engine_config_only(engine_args: Any, **kwargs: Any) -> AsyncIterator[None]:
        seen["stage"] = "engine configuration"
        config = engine_args.create_engine_config(usage_context=kwargs.get("usage_context"))
        model = config.model_config
        seen["config"] = {
            "model": model.model,
            "served_model_name": model.served_model_name,
            "quantization": model.quantization,
            "dtype": str(model.dtype).removeprefix("torch."),
            "max_model_len": model.max_model_len,
            "kv_cache_dtype": str(config.cache_config.cache_dtype),
            "tensor_parallel_size": config.parallel_config.tensor_parallel_size,
        }
        raise EngineWouldStart
        yield  # pragma: no cover - never reached

    entry.setup_server = setup_and_remember
    entry.build_async_engine_client_from_engine_args = engine_config_only
    return seen


def check_command(case: dict[str, Any]) -> None:
    name, gpu = case["name"], (case["gpu"][0], float(case["gpu"][1]))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            command = guard_command(gpu, list(case["args"]))
    except SystemExit as exit_:
        report(name=name, ok=False, stage="guard", code=exit_.code, error=err.getvalue()[-2000:])
        return
    seen = stop_where_the_engine_starts()
    main = vllm_program(command[0])
    sys.argv = [command[0], *command[1:]]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            main()
        result: dict[str, Any] = {"ok": False, "stage": "vllm", "error": "vLLM returned"}
    except EngineWouldStart:
        result = {"ok": True, "stage": "engine", "config": seen["config"]}
    except SystemExit as exit_:  # argparse and vLLM's CLI exit on a bad argument
        error = err.getvalue()[-2000:]
        result = {"ok": False, "stage": seen["stage"], "code": exit_.code, "error": error}
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"[-2000:]
        result = {"ok": False, "stage": seen["stage"], "error": error}
        if os.environ.get("ENGINE_CHECK_TRACEBACK"):
            traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            seen["socket"].close()
    report(name=name, command=command, **result)


def check_plugins(case: dict[str, Any]) -> None:
    try:
        import bitsandbytes

        bnb: str | None = str(bitsandbytes.__version__)
    except Exception as exc:
        bnb = None
        bnb_error = f"{type(exc).__name__}: {exc}"
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    plugins = sorted(e.name for e in importlib.metadata.entry_points(group="vllm.general_plugins"))
    report(
        name=case["name"],
        ok=True,
        bitsandbytes=bnb,
        bitsandbytes_error=None if bnb else bnb_error,
        plugins=plugins,
        quantization_methods=sorted(QUANTIZATION_METHODS),
    )


def main(path: str) -> int:
    with open(path) as f:
        cases = json.load(f)
    for case in cases:
        try:
            {"command": check_command, "plugins": check_plugins}[case["kind"]](case)
        except Exception as exc:  # a defect of this script: say so, go on with the next case
            report(name=case["name"], ok=False, stage="engine_check", error=repr(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
