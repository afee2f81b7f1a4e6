"""Stacks that ``bench --methods`` and ``compare`` start for one method and stop again: missing
images built first, then ``up`` and a wait until every health check passes, as
``deploykit up --wait`` does; ``down`` (with its volumes) however the block ends."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from deploykit import render, stack
from deploykit.commands.build import build_cells
from deploykit.commands.stack import wait_for
from deploykit.docker import Docker


@contextlib.contextmanager
def method_stack(
    plan: stack.StackPlan, timeout: float, say: Callable[[str], None]
) -> Iterator[stack.StackRecord]:
    """The planned stack, up and healthy, for the duration of the block."""
    docker = Docker.connect()
    images = render.stack_images([plan.cell], plan.options.image_version)
    if not all(docker.image_exists(i.tag) for i in images):
        say(f"{plan.cell.quant}: building missing images")
        build_cells(docker, [plan.cell], None, None)
    say(
        f"{plan.cell.quant}: starting stack {plan.name!r} ({plan.cell.quant} on "
        f"{plan.cell.gpu_class}, model {plan.served_model_name!r})"
    )
    record: stack.StackRecord | None = None
    start = time.monotonic()
    try:
        stack.up(plan)  # compose waits until the engine has loaded the model
        record = stack.load_record(plan.folder)
        wait_for(record, timeout)
        say(f"{plan.cell.quant}: healthy {time.monotonic() - start:.0f} s after up")
        yield record
    finally:
        if record is not None:
            stack.down(record)
            stack.forget_stack(record.folder)
            say(f"{plan.cell.quant}: stack {record.name!r} down")
