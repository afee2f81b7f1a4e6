"""Subcommands of the ``deploykit`` CLI, one module per group.

Each module exposes ``register(app)``; ``deploykit.cli`` calls them in this order, which is also
the order ``deploykit --help`` lists them in. Options several commands share are declared once, in
``deploykit.commands.options``.
"""

from __future__ import annotations

from types import ModuleType

from deploykit.commands import (
    bench,
    bridge,
    build,
    client,
    compare,
    core,
    preflight,
    serve,
    soak,
    stack,
    top,
)

COMMAND_MODULES: tuple[ModuleType, ...] = (
    core,
    preflight,
    build,
    stack,
    serve,
    client,
    top,
    soak,
    bench,
    compare,
    bridge,
)
