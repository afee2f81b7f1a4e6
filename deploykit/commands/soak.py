"""CLI command: soak (faults under load against a running stack)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import typer
from rich.console import Console

from deploykit import health, hoststacks, soak
from deploykit.commands import options
from deploykit.docker import Docker
from deploykit.errors import CheckFailed, UsageError

_err = Console(stderr=True, highlight=False)

#: Seconds the load goes on past the last fault's recovery: the run shows the stack serving again.
AFTER_RECOVERY_S = 10.0


def register(app: typer.Typer) -> None:
    @app.command("soak")
    def soak_cmd(
        name: str | None = options.name_option(),
        state_dir: Path = options.state_dir_option(),
        project: str | None = typer.Option(
            None, "--project", help="The project to load (default: the stack's first)."
        ),
        duration: float = typer.Option(
            600.0,
            "--duration",
            help=f"Seconds of load (it goes on {AFTER_RECOVERY_S:g} s past the last fault's "
            "recovery).",
        ),
        faults: str = typer.Option(
            ",".join(soak.FAULTS),
            "--faults",
            help=f"Faults in turn, spread over the run: {', '.join(soak.FAULTS)} (or none).",
        ),
        sessions: int = typer.Option(16, "--sessions", help="Sessions asking at once."),
        timeout: float = typer.Option(
            30.0, "--timeout", help="Seconds without an answer before a client asks again."
        ),
        cut: float = typer.Option(
            20.0,
            "--cut",
            help="Seconds of network-cut; make it longer than three of the bridge's keepalives.",
        ),
        json_out: Path | None = typer.Option(None, "--json", help="Also write the report here."),
    ) -> None:
        """Load a running stack from clients that retry, while its parts fail in turn (the
        bridge and engine crash, the broker restarts, the bridge's network is cut, the engine
        hangs); exit 1 if any request was lost. The crash faults need root."""
        chosen = [f.strip() for f in faults.split(",") if f.strip() and f.strip() != "none"]
        unknown = sorted(set(chosen) - set(soak.FAULTS))
        if unknown:
            raise UsageError(
                f"unknown fault {', '.join(unknown)}", f"pick from: {', '.join(soak.FAULTS)}"
            )
        if duration <= 0 or sessions < 1:
            raise UsageError("--duration and --sessions must be positive")
        record = hoststacks.find_stack(name, state_dir)
        project_name = project or record.projects[0]
        if project_name not in record.projects:
            raise UsageError(
                f"the stack {record.name!r} does not serve project {project_name!r}",
                f"pick one of: {', '.join(record.projects)}",
            )
        docker = Docker.connect()
        target = health.StackTarget(record, docker, project=project_name)

        def wait_healthy() -> float | None:
            results, waited = health.wait_healthy(
                lambda: health.default_checks(target), timeout_s=600, pause_s=2.0
            )
            return waited if all(r.passed for r in results) else None

        async def run() -> soak.SoakReport:
            async with soak.RetryingClients(
                target.address,
                project_name,
                target.credentials(),
                sessions=sessions,
                timeout_s=timeout,
            ) as clients:
                return await soak.soak(
                    clients,
                    soak.StackFaults(docker, record, cut_s=cut),
                    duration_s=duration,
                    fault_names=chosen,
                    wait_healthy=wait_healthy,
                    after_s=AFTER_RECOVERY_S,
                    progress=lambda line: _err.print(line, markup=False),
                )

        _err.print(
            f"soak of stack {record.name!r} (project {project_name}): {duration:.0f} s, "
            f"{sessions} sessions, faults: {', '.join(chosen) or 'none'}"
        )
        started = time.monotonic()
        report = asyncio.run(run())
        print(report.text())
        if json_out is not None:
            json_out.write_text(json.dumps(report.as_dict(), indent=1) + "\n")
        _err.print(f"soak done in {time.monotonic() - started:.0f} s")
        if not report.ok:
            raise CheckFailed(
                f"the soak run lost {len(report.lost)} requests, {sum(report.failed.values())} "
                "failed, or a fault did not recover",
                f"see `deploykit logs --name {record.name}`",
            )
        sys.stdout.flush()
