"""``deploykit serve`` instances that ``bench --methods --serve`` starts for one method and stops
again: ``deploykit serve`` in a process of its own (its own session, so Ctrl-C reaches this command
first), a wait until every health check of the instance passes, SIGTERM however the block ends.

What serve prints goes to ``<method>-serve.log`` in the results folder, and each process's log to
``<method>-logs/`` there, so the engine's start-up lines stay with the figures.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from deploykit import health, interrupts, stack
from deploykit.bench import methods
from deploykit.bench.limits import BENCH_PROJECT
from deploykit.errors import CheckFailed, UsageError
from deploykit.serve.processes import tail

#: Seconds serve may take to stop its processes after SIGTERM (its own --grace is 30 s each).
STOP_WAIT_S = 120.0


@dataclass(frozen=True)
class ServeOptions:
    """How ``bench --methods --serve`` starts each method's instance."""

    state_dir: Path
    mqtt_port: int
    engine_port: int
    bridge_port: int
    bridge_config: Path
    vllm_python: str | None = None
    gpus: str | None = None
    gpu_class: str | None = None


def serve_command(
    mp: methods.MethodPlan, opts: ServeOptions, logs: Path, timeout: float
) -> list[str]:
    """The ``deploykit serve`` command of one planned method (no secret in it)."""
    assert mp.plan is not None
    plan = mp.plan
    # as given (a compose plan's options name the folder as mounted in the container)
    model = mp.model or plan.options.model
    assert model is not None  # the method's default (a Hub id) when --model left it out
    argv = [
        sys.executable, "-m", "deploykit", "serve",
        "--quant", str(plan.cell.quant),
        "--model", model,
        "--projects", BENCH_PROJECT,
        "--bridge-config", str(opts.bridge_config),
        "--name", plan.name,
        "--state-dir", str(opts.state_dir),
        "--mqtt-port", str(opts.mqtt_port),
        "--engine-port", str(opts.engine_port),
        "--bridge-port", str(opts.bridge_port),
        "--logs", str(logs),
        "--timeout", str(timeout),
    ]  # fmt: skip
    if opts.gpus is not None:
        argv += ["--gpus", opts.gpus]
    if opts.gpu_class is not None:
        argv += ["--gpu-class", opts.gpu_class]
    if opts.vllm_python is not None:
        argv += ["--vllm-python", opts.vllm_python]
    return argv


@contextlib.contextmanager
def method_serve(
    mp: methods.MethodPlan,
    opts: ServeOptions,
    folder: Path,
    timeout: float,
    say: Callable[[str], None],
) -> Iterator[stack.StackRecord]:
    """The method's serve instance, healthy, for the duration of the block."""
    assert mp.plan is not None
    plan = mp.plan
    out = folder / f"{mp.method}-serve.log"
    argv = serve_command(mp, opts, folder / f"{mp.method}-logs", timeout)
    say(
        f"{mp.method}: starting `deploykit serve` {plan.name!r} ({plan.cell.quant} on "
        f"{plan.cell.gpu_class}, model {argv[argv.index('--model') + 1]!r}; its output: {out})"
    )
    start = time.monotonic()
    proc = None
    try:
        # a Ctrl-C now lands once serve's process is known, so it is stopped below
        with out.open("ab") as log, interrupts.held():
            proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        record = _wait_healthy(proc, plan.folder, out, timeout + 120.0)
        say(f"{mp.method}: healthy {time.monotonic() - start:.0f} s after start")
        yield record
    finally:
        if proc is not None:
            _stop(proc)
            say(f"{mp.method}: serve {plan.name!r} stopped (exit {proc.returncode})")


def _wait_healthy(
    proc: subprocess.Popen[bytes], folder: Path, out: Path, timeout: float
) -> stack.StackRecord:
    """The instance's record once every health check passes; CheckFailed, with the end of serve's
    output, when serve ends first or the time is up."""
    deadline = time.monotonic() + timeout
    results: Sequence[health.CheckResult] = ()
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise CheckFailed(
                f"deploykit serve ended with exit status {proc.returncode} before it was "
                f"healthy; the end of its output ({out}):\n{tail(out)}",
                f"see {out} and the logs folder beside it",
            )
        try:
            record = stack.load_record(folder)
        except (UsageError, OSError, ValueError, KeyError):  # not written yet, or half written
            record = None
        if record is not None and record.serve is not None:
            target = health.StackTarget(record, None, project=BENCH_PROJECT)
            results = health.run_layers(health.default_checks(target))
            if all(r.passed for r in results):
                return record
        time.sleep(2.0)
    failed = [f"{r.name}: {r.detail}" for r in results if not r.passed]
    raise CheckFailed(
        f"deploykit serve was not healthy after {timeout:.0f} s"
        + (f" ({'; '.join(failed)})" if failed else ""),
        f"see {out}; allow longer with --timeout",
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to serve (it stops what it started), SIGKILL to its session after STOP_WAIT_S."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_WAIT_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
