"""CLI command: compare. The figures live in ``deploykit.bench.compare``; this module resolves
the two sides (a running stack, or a stack started for a method and stopped afterwards), shows
progress and writes compare.json and compare.md."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from deploykit import hoststacks, stack
from deploykit.bench import compare, engine, methods, prompts
from deploykit.commands import options
from deploykit.commands.methodstacks import method_stack
from deploykit.commands.stack import free_port
from deploykit.docker import Docker
from deploykit.errors import UnsupportedError, UsageError

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_out = Console(highlight=False, soft_wrap=True)

SIDE_HELP = (
    "A method (none, fp8, awq, gptq, bitsandbytes: a stack is started for it on the pinned GPUs "
    "and stopped afterwards), or stack:NAME (a running stack, see `deploykit ls`)."
)


def _say(text: str) -> None:
    _err.print(text, markup=False)


def describe(record: stack.StackRecord, side: compare.Side) -> str:
    started = "" if side.stack else ", started for this comparison"
    return (
        f"`{record.name}` ({record.quant} on {record.gpu_class}, model "
        f"`{record.served_model_name}`{started})"
    )


@contextlib.contextmanager
def side_stack(
    side: compare.Side, plan: methods.MethodPlan | None, state_dir: Path, timeout: float
) -> Iterator[stack.StackRecord]:
    """The stack of one side: running already, or started for the block."""
    if side.stack is not None:
        yield hoststacks.find_stack(side.stack, state_dir)
        return
    assert plan is not None and plan.plan is not None
    with method_stack(plan.plan, timeout, _say) as record:
        yield record


def score_side(
    label: str,
    record: stack.StackRecord,
    prompt_list: tuple[str, ...],
    max_tokens: int,
    force: list[list[int]] | None,
) -> tuple[list[compare.Scored], bool]:
    """Score the prompts on one stack; (what was scored, whether Ctrl-C stopped it)."""
    done: list[compare.Scored] = []

    def tell(s: compare.Scored) -> None:
        done.append(s)
        _err.print(
            f"{label}: prompt {s.index + 1}/{len(prompt_list)}: {len(s.output_ids)} tokens "
            f"({s.finish_reason})",
            markup=False,
        )

    try:
        docker = Docker.connect() if record.serve is None else None
        compare.score(
            engine.connect(record, docker), prompt_list, max_tokens, force=force, on_scored=tell
        )
    except KeyboardInterrupt:
        return done, True
    return done, False


def register(app: typer.Typer) -> None:
    """Add this module's command to the app."""

    @app.command("compare")
    def compare_cmd(
        baseline: str = typer.Option(..., "--baseline", help=f"The reference. {SIDE_HELP}"),
        candidate: str = typer.Option(..., "--candidate", help=f"Compared with it. {SIDE_HELP}"),
        model: str | None = options.methods_model_option("For the methods' stacks"),
        prompts_file: Path | None = typer.Option(
            None,
            "--prompts",
            help="Prompts, one per line (or .jsonl). Default: the kit's prompt set.",
            show_default=False,
        ),
        max_tokens: int = typer.Option(
            128, "--max-tokens", min=1, help="Longest greedy output per prompt, in tokens."
        ),
        out: Path | None = typer.Option(
            None,
            "--out",
            help="Folder for compare.json and compare.md. Default: bench-results/compare-<time>.",
            show_default=False,
        ),
        gpus: str | None = options.methods_gpus_option("For the methods' stacks"),
        gpu_class: str | None = options.gpu_class_option(
            " For the methods' stacks; default: the GPUs'."
        ),
        mqtt_port: int | None = options.methods_mqtt_port_option("For the methods' stacks"),
        timeout: float = options.methods_timeout_option("For the methods' stacks"),
        name: str | None = typer.Option(
            None,
            "--name",
            "-n",
            help="Name prefix of the stacks started for methods (default: compare).",
            show_default=False,
        ),
        state_dir: Path = options.state_dir_option(),
    ) -> None:
        """Compare a candidate with a baseline on the same prompts, greedy, one prompt at a time:
        exact-match rate, mean matching prefix, and the candidate's KL divergence from the
        baseline's next-token distributions and top-1 agreement, teacher-forced on the baseline's
        outputs (vLLM's prompt log-probabilities)."""
        sides = (
            compare.parse_side(baseline, "--baseline"),
            compare.parse_side(candidate, "--candidate"),
        )
        used = [s.method for s in sides if s.method is not None]
        if model is not None and not used:
            raise UsageError(
                "--model goes with a method side only", "a running stack serves its own model"
            )
        models = methods.parse_models(model, tuple(dict.fromkeys(used)))
        prompt_list, source = prompts.load(prompts_file)
        prefix = stack.check_stack_name(name or "compare")
        port = mqtt_port if mqtt_port is not None else free_port(18830)
        plans: list[methods.MethodPlan | None] = []
        for role, side in zip(("baseline", "candidate"), sides, strict=True):
            if side.stack is not None:
                hoststacks.find_stack(side.stack, state_dir)  # exists, before anything starts
                plans.append(None)
                continue
            assert side.method is not None
            (plan,) = methods.plan_methods(
                (side.method,), models, name_prefix=f"{prefix}-{role}", state_dir=state_dir,
                bridge_config=None, gpus=gpus, gpu_class=gpu_class, mqtt_port=port,
            )  # fmt: skip
            if plan.plan is None:
                raise UnsupportedError(
                    f"--{role} {side.method} does not run here: {plan.refused}",
                    "see `deploykit matrix` and `deploykit gpus`",
                )
            stack.check_engine_can_read(plan.plan)
            plans.append(plan)
        folder = out or Path("bench-results") / (
            "compare-" + dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        )
        labels: list[str] = []
        with side_stack(sides[0], plans[0], state_dir, timeout) as record:
            labels.append(describe(record, sides[0]))
            base, stopped = score_side("baseline", record, prompt_list, max_tokens, None)
        if not stopped:
            with side_stack(sides[1], plans[1], state_dir, timeout) as record:
                labels.append(describe(record, sides[1]))
                forced = [s.output_ids for s in base]
                cand, stopped = score_side(
                    "candidate", record, prompt_list[: len(base)], max_tokens, forced
                )
        else:
            cand, labels = [], [*labels, str(sides[1])]
        result = compare.compare(base, cand)
        settings: dict[str, Any] = {
            "command": shlex.join(["deploykit", *sys.argv[1:]]),
            "prompt_source": source,
            "prompts": len(prompt_list),
            "max_tokens": max_tokens,
            "top_k": compare.TOP_K,
            "interrupted": stopped,
        }
        text = compare.markdown(result, labels[0], labels[1], settings)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "compare.md").write_text(text)
        (folder / "compare.json").write_text(
            json.dumps(
                {
                    "kind": "deploykit-compare",
                    "version": 1,
                    "baseline": labels[0],
                    "candidate": labels[1],
                    "settings": settings,
                    "comparison": result.to_json(),
                    "baseline_outputs": [s.text for s in base],
                    "candidate_outputs": [s.text for s in cand],
                },
                indent=1,
            )
            + "\n"
        )
        _out.print(text, markup=False)
        _err.print(f"wrote {folder / 'compare.json'}, {folder / 'compare.md'}", markup=False)
        if stopped:
            raise typer.Exit(130)
