"""Which of a project's settings would shape a benchmark's load, and the bench project's config.

A benchmark through a project's rate limit (default 1200 requests a minute, bursts of 200), its
queue bound or a cap on its engine slots measures those limits, not the stack. ``deploykit bench``
therefore reads the project's settings from the running bridge (its own config code, so the
defaults of that bridge count) and refuses a project where any of them would bind at the
highest concurrency asked for; it says in its output that none does. The bridge's settings are
documented in deploykit/bridge/config.py.

Pure, except :func:`read_project_settings` at the bottom (``docker exec`` in the bridge).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from deploykit.errors import CheckFailed

if TYPE_CHECKING:
    from deploykit.bridge.config import BridgeConfig

#: The project ``deploykit bench`` uses when the stack serves it.
BENCH_PROJECT = "bench"

#: The bench project: greedy answers of exactly the asked length (``ignore_eos``), no history,
#: no rate limit, and bounds no benchmark reaches. Keys and meanings: deploykit/bridge/config.py.
BENCH_PROJECT_CONFIG: dict[str, Any] = {
    "default_temperature": 0.0,
    "max_max_tokens": 4096,
    "max_history_tokens": 0,
    "engine_extra": {"ignore_eos": True},
    "rate_limit_per_minute": None,
    "rate_limit_burst": None,
    "max_queued": 100000,
    "receive_maximum": 65535,
}


@dataclass(frozen=True)
class ProjectSettings:
    """The settings of one project that matter to a benchmark, as the running bridge has them."""

    project: str
    rate_limit_per_minute: float | None
    rate_limit_burst: int | None
    max_queued: int
    max_engine_slots: int | None
    receive_maximum: int
    max_max_tokens: int
    max_in_flight: int  # the bridge's engine slots, all projects together
    system_prompt: str | None = None
    engine_extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, project: str, data: dict[str, Any]) -> ProjectSettings:
        """From ``{"project": ProjectConfig fields, "bridge": BridgeTuning fields}``."""
        p, b = data["project"], data["bridge"]
        return cls(
            project=project,
            rate_limit_per_minute=p.get("rate_limit_per_minute"),
            rate_limit_burst=p.get("rate_limit_burst"),
            max_queued=int(p["max_queued"]),
            max_engine_slots=p.get("max_engine_slots"),
            receive_maximum=int(p["receive_maximum"]),
            max_max_tokens=int(p["max_max_tokens"]),
            max_in_flight=int(b["max_in_flight"]),
            system_prompt=p.get("system_prompt"),
            engine_extra=dict(p.get("engine_extra") or {}),
        )

    @property
    def fixed_length(self) -> bool:
        """Whether every answer has exactly the asked length (the engine ignores end-of-sequence)."""
        return bool(self.engine_extra.get("ignore_eos"))

    def to_json(self) -> dict[str, Any]:
        return {
            "project": self.project,
            "rate_limit_per_minute": self.rate_limit_per_minute,
            "rate_limit_burst": self.rate_limit_burst,
            "max_queued": self.max_queued,
            "max_engine_slots": self.max_engine_slots,
            "receive_maximum": self.receive_maximum,
            "max_max_tokens": self.max_max_tokens,
            "max_in_flight": self.max_in_flight,
            "system_prompt": self.system_prompt is not None,
            "engine_extra": self.engine_extra,
        }


def problems(s: ProjectSettings, concurrency: int, max_tokens: int) -> list[str]:
    """What would shape (or refuse) a load of ``concurrency`` requests at once, each asking for
    ``max_tokens``; empty when nothing would."""
    out = []
    if s.rate_limit_per_minute is not None:
        burst = f", bursts of {s.rate_limit_burst}" if s.rate_limit_burst is not None else ""
        out.append(f"a rate limit of {s.rate_limit_per_minute:g} requests a minute{burst}")
    if s.max_queued < concurrency:
        out.append(f"max_queued {s.max_queued} < concurrency {concurrency}")
    if s.max_engine_slots is not None and s.max_engine_slots < concurrency:
        out.append(f"max_engine_slots {s.max_engine_slots} < concurrency {concurrency}")
    if s.receive_maximum < concurrency:
        out.append(f"receive_maximum {s.receive_maximum} < concurrency {concurrency}")
    if s.max_in_flight < concurrency:
        out.append(f"the bridge's max_in_flight {s.max_in_flight} < concurrency {concurrency}")
    if s.max_max_tokens < max_tokens:
        out.append(f"max_max_tokens {s.max_max_tokens} < --max-tokens {max_tokens}")
    return out


def statement(s: ProjectSettings, concurrency: int) -> str:
    """The line a benchmark prints (and its results keep): no limit shapes this load."""
    slots = (
        f"{s.max_in_flight} engine slots (bridge)"
        if s.max_engine_slots is None
        else f"{min(s.max_engine_slots, s.max_in_flight)} engine slots"
    )
    return (
        f"project {s.project!r}: rate limit off; queue bound {s.max_queued}, {slots}, receive "
        f"maximum {s.receive_maximum}, all >= concurrency {concurrency}: no limit shapes this load"
    )


def bench_config(existing: dict[str, Any] | None, project: str = BENCH_PROJECT) -> str:
    """A bridge config: the stack's own (``existing``, as parsed YAML) with ``project`` added as
    the bench project. Everything else stays as it was."""
    config = copy.deepcopy(existing) if existing else {}
    projects = config.setdefault("projects", {}) or {}
    config["projects"] = projects
    projects[project] = copy.deepcopy(BENCH_PROJECT_CONFIG)
    header = (
        f"# Bridge config with the benchmark project {project!r}: rate limits off, fixed-length\n"
        "# greedy answers (ignore_eos), no history. Written by `deploykit bench --print-config`;\n"
        "# keys: deploykit/bridge/config.py. Any client of this project reaches the engine\n"
        "# without limits: remove the project when the benchmarks are done.\n"
    )
    return header + yaml.safe_dump(config, sort_keys=False)


def refusal_hint(stack: str, projects: tuple[str, ...], project: str = BENCH_PROJECT) -> str:
    """What to type to get a bench project with its limits off on this stack."""
    wanted = ",".join(dict.fromkeys((*projects, project)))
    return (
        f"serve a project with its limits off: deploykit bench --name {stack} --print-config > "
        f"bench.yaml, then deploykit up --name {stack} --projects {wanted} --bridge-config "
        f"bench.yaml (with the stack's other options, e.g. --model), then deploykit bench "
        f"--name {stack} --project {project}"
    )


# --- the edge: the running bridge's own view of a project's settings ---------------------------


def settings_data(config: BridgeConfig, project: str) -> dict[str, Any]:
    """What :meth:`ProjectSettings.from_config` reads, from a bridge config as a bridge loads it
    (its defaults merged): the same for a compose stack's bridge (run inside its container, below)
    and a ``deploykit serve`` instance's (here)."""
    return {
        "project": config.project(project).model_dump(mode="json"),
        "bridge": config.bridge.model_dump(mode="json"),
    }


_READ = """
import json, os, sys
from pathlib import Path
from deploykit.bench.limits import settings_data
from deploykit.bridge.config import load_config
path = os.environ.get("DEPLOYKIT_BRIDGE_CONFIG")
print(json.dumps(settings_data(load_config(Path(path) if path else None), sys.argv[1])))
"""


def read_project_settings(docker: Any, bridge_container: str, project: str) -> ProjectSettings:
    """The project's settings as the running bridge loads them (its config file and defaults)."""
    code, out = docker.exec(bridge_container, ["python3", "-c", _READ, project])
    if code != 0:
        raise CheckFailed(
            f"cannot read the bridge's settings of project {project!r}: {out.strip()[-300:]}",
            "see `deploykit logs bridge`",
        )
    return ProjectSettings.from_config(project, json.loads(out.strip().splitlines()[-1]))
