"""The ``deploykit`` command: parse, call one function, print, map errors to exit codes.

Each group of subcommands lives in its own module under ``deploykit.commands`` and registers
itself on the app through ``register(app)``. Errors are caught in one place (``main``).
"""

from __future__ import annotations

import sys
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from deploykit import __version__
from deploykit.commands import COMMAND_MODULES
from deploykit.errors import DeployKitError

app = typer.Typer(
    name="deploykit",
    help="Deploy quantized LLMs with vLLM behind MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for _module in COMMAND_MODULES:
    _module.register(app)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"deploykit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    """Deploy quantized LLMs with vLLM behind MQTT."""


def report_error(err: DeployKitError, console: Console | None = None) -> None:
    """Print an error and its hint the same way everywhere."""
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    # the message is text (it may quote a log with [brackets]), never markup
    console.print(f"[bold red]error:[/] {escape(err.message)}", markup=True)
    if err.hint:
        console.print(f"[bold yellow]hint:[/] {escape(err.hint)}", markup=True)


def _flags_take_no_value(command: Any) -> None:
    """Show on/off flags (``--wait``, ``--help``) without a value type in help: typer would show
    ``--wait <bool>``, as if the flag took a value."""
    ctx = typer.Context(command, info_name=command.name)
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_take_no_value(sub)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script. Usage errors exit 2 (click's own handling)."""
    command = typer.main.get_command(app)
    _flags_take_no_value(command)
    try:
        command.main(args=argv, prog_name="deploykit")
    except DeployKitError as err:
        report_error(err)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
