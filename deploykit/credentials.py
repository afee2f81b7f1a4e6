"""``deploykit credentials``: how a client reaches one project of a stack.

The broker's address, the project's username (the project's name) and the path of its password
file, never the password itself; and ready-to-paste clients (``render.client_snippets``) that read
the password from that file or the environment, never from a command line.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploykit import names, render
from deploykit.errors import UsageError
from deploykit.mqttclient import parse_broker_url
from deploykit.ports import REDIS_PORT
from deploykit.secrets import WORKER_SECRETS, SecretsFolder, copy_private
from deploykit.stack import StackRecord

PROTOCOL_REFERENCE = "deploykit/bridge/README.md"


@dataclass(frozen=True)
class ClientAccess:
    """What a client of one project needs, without the password."""

    stack: str
    project: str
    host: str
    port: int
    password_file: Path

    @property
    def username(self) -> str:
        return self.project

    @property
    def broker(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def snippets(self) -> dict[str, str]:
        return render.client_snippets(
            host=self.host,
            port=self.port,
            project=self.project,
            password_file=str(self.password_file),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stack": self.stack,
            "project": self.project,
            "broker": self.broker,
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "password_file": str(self.password_file),
            "request_topic": names.request_topic(self.project),
            "reply_topic": names.default_reply_topic(self.project, "{sessionId}"),
            "protocol": PROTOCOL_REFERENCE,
            "snippets": self.snippets(),
        }


def chosen_project(record: StackRecord, project: str | None) -> str:
    """``project`` when the stack serves it, else its first project."""
    chosen = project or record.projects[0]
    if chosen not in record.projects:
        raise UsageError(
            f"the stack {record.name!r} serves projects {', '.join(record.projects)}, not {chosen!r}",
            f"pick one with --project, or add it: deploykit up --name {record.name} --projects "
            f"{','.join((*record.projects, chosen))} (with the stack's other options)",
        )
    return chosen


def client_access(
    record: StackRecord, project: str | None, host: str = "127.0.0.1"
) -> ClientAccess:
    """One project's access to a stack (its first project by default)."""
    record.check_has_broker("a client's access")
    serve = record.serve
    if serve is not None and not serve.local_broker:
        raise UsageError(
            f"the serve instance {record.name!r} uses the broker {serve.broker_url}, whose accounts "
            "are its owner's, not this kit's",
            "ask the broker's owner for a project account",
        )
    chosen = chosen_project(record, project)
    path = SecretsFolder(record.secrets_dir).client_password_file(chosen)
    if not path.is_file():
        raise UsageError(
            f"the password file of project {chosen!r} is missing: {path}",
            f"run `deploykit up --name {record.name}` again, which generates it",
        )
    return ClientAccess(record.name, chosen, host, record.mqtt_port, path)


# --- worker hosts ---------------------------------------------------------------------------------

#: The files of a worker bundle besides the secrets: what the worker joins, and as whom.
BUNDLE_INFO = ("worker", "broker_url", "redis_url", "projects")


@dataclass(frozen=True)
class WorkerBundle:
    """What ``deploykit up --role worker`` needs from the broker host, as a folder of files (the
    folder owner-only, each file too): the secrets in ``deploykit.secrets.WORKER_SECRETS`` and
    the broker's and Redis's addresses, the worker's name and the projects."""

    folder: Path
    worker: str
    broker_url: str
    redis_url: str
    projects: tuple[str, ...]

    def secret_files(self) -> list[Path]:
        return [self.folder / name for name in WORKER_SECRETS]


def write_worker_bundle(
    record: StackRecord, worker: str, out: Path, host: str | None = None
) -> WorkerBundle:
    """A bundle for worker host ``worker`` joining the stack ``record`` (which must publish its
    Redis: ``up --redis-port``); ``host`` is how the worker reaches this host."""
    record.check_has_broker("issuing worker bundles")
    problem = names.client_string_problem(worker, "the worker's name", max_length=40)
    if problem or not worker or any(c in worker for c in "/+#$ ,"):
        raise UsageError(
            f"--worker {worker!r} is not a usable name",
            "letters, digits, '-' and '_', e.g. --worker gpu-box-2",
        )
    if record.redis_port is None:
        raise UsageError(
            f"the stack {record.name!r} does not publish its Redis, which worker hosts share "
            "the sessions' state in",
            f"start it with a Redis port for workers: deploykit up --name {record.name} "
            f"--redis-port {REDIS_PORT + 1} (with its other options)",
        )
    host = host or socket.getfqdn()
    folder = SecretsFolder(record.secrets_dir)
    copy_private([(folder.path / name, out / name) for name in WORKER_SECRETS])
    bundle = WorkerBundle(
        out,
        worker,
        f"mqtt://{host}:{record.mqtt_port}",
        f"redis://{host}:{record.redis_port}/0",
        record.projects,
    )
    info = {
        "worker": worker,
        "broker_url": bundle.broker_url,
        "redis_url": bundle.redis_url,
        "projects": ",".join(record.projects),
    }
    for name, text in info.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.chmod(0o600)
        tmp.replace(out / name)
    return bundle


def read_worker_bundle(folder: Path) -> WorkerBundle:
    """A bundle written by :func:`write_worker_bundle` (copied to the worker host)."""
    values = {}
    for name in (*BUNDLE_INFO, *WORKER_SECRETS):
        path = folder / name
        if not path.is_file():
            raise UsageError(
                f"the worker bundle {folder} has no {name}",
                "copy the whole folder `deploykit credentials --worker NAME` wrote on the broker host",
            )
        if name in BUNDLE_INFO:
            values[name] = path.read_text().strip()
        elif path.stat().st_mode & 0o077:
            raise UsageError(
                f"the worker bundle's secret {path} can be read by others "
                f"(mode {path.stat().st_mode & 0o777:o})",
                f"make it owner-only: chmod -R go= {folder} (copy bundles with `scp -rp` or "
                "`rsync -a`, which keep the modes)",
            )
    parse_broker_url(values["broker_url"])  # a clear error now, not a bridge that cannot connect
    if not values["redis_url"].startswith("redis://"):
        raise UsageError(
            f"the worker bundle {folder}: redis_url {values['redis_url']!r} is not redis://HOST:PORT/DB",
            "write the bundle again on the broker host: deploykit credentials --worker NAME",
        )
    return WorkerBundle(
        folder,
        values["worker"],
        values["broker_url"],
        values["redis_url"],
        tuple(p for p in values["projects"].split(",") if p),
    )
