"""The CLI's surface through the real entry point: help that says what each flag takes, one flag
name per meaning, usage errors (exit 2) that say what was wrong."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from deploykit import stack
from deploykit.errors import ExitCode
from deploykit.matrix import METHODS, Quant

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    "matrix",
    "render",
    "gpus",
    "doctor",
    "plan",
    "base-images",
    "build",
    "wheelhouse",
    "up",
    "down",
    "ps",
    "logs",
    "ls",
    "health",
    "chat",
    "credentials",
    "top",
    "bench",
    "compare",
    "bridge",
]


def deploykit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200", "TERM": "dumb"}
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def help_rows(command: str) -> dict[str, str]:
    """Each option of a command's --help: its name -> the rest of its row."""
    result = deploykit(command, "--help")
    assert result.returncode == 0, result.stderr
    rows = {}
    for line in result.stdout.splitlines():
        m = re.match(r"^│\s+(--[a-z-]+)(.*?)│?$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.mark.parametrize("command", COMMANDS)
def test_flags_show_no_value_and_every_option_says_what_it_does(command: str) -> None:
    result = deploykit(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout, f"{command} --help shows a flag as taking a value"
    for option, row in help_rows(command).items():
        words = re.sub(r"-\w\b|<\w+>|\[default: [^]]*\]", "", row).strip()
        assert words, f"`{command} {option}` has no help text"


def test_root_help_lists_every_command() -> None:
    out = deploykit("--help").stdout
    for command in COMMANDS:
        assert re.search(rf"│ {command}\s", out), command


def test_up_help_lists_the_methods_and_classes() -> None:
    out = " ".join(deploykit("up", "--help").stdout.split())
    for q in Quant:
        if not METHODS[q].removed:
            assert q.value in out
    for c in ("cuda-fp8", "cuda", "cpu"):
        assert c in out


def test_one_flag_name_per_meaning() -> None:
    """--rebuild rebuilds (up, build, base-images); --force overrides the pre-flight gate;
    --wait is an on/off flag with --timeout wherever it waits."""
    for command in ("up", "build", "base-images"):
        assert "--rebuild" in help_rows(command), command
    assert "--force" not in help_rows("base-images")
    for command in ("up", "build"):
        assert "gate" in " ".join(help_rows(command)["--force"].split())
    for command in ("up", "health"):
        rows = help_rows(command)
        assert "<float>" not in rows["--wait"] and "<float>" in rows["--timeout"]
    for command in ("down", "ps", "logs", "health", "chat", "credentials", "top", "bench"):
        assert "--name" in help_rows(command), command


def test_health_wait_takes_no_value() -> None:
    result = deploykit("health", "--wait", "5")
    assert result.returncode == ExitCode.USAGE
    assert "unexpected extra argument" in result.stderr.lower()


def test_plan_of_a_missing_model_folder_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent"
    result = deploykit("plan", "--model", str(missing), "--gpu", "H100-80GB")
    assert result.returncode == ExitCode.USAGE == 2, result.stderr
    assert f"error: the model folder {missing} does not exist" in result.stderr
    assert "hint:" in result.stderr
    (tmp_path / "empty").mkdir()
    result = deploykit("plan", "--model", str(tmp_path / "empty"), "--gpu", "H100-80GB")
    assert result.returncode == 2 and "has no config.json" in result.stderr


def test_up_with_a_missing_model_folder_is_a_usage_error(tmp_path: Path) -> None:
    result = deploykit("up", "--model", "./no-such-checkpoint", "--state-dir", str(tmp_path))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "--model ./no-such-checkpoint: the folder does not exist" in result.stderr
    assert not any(tmp_path.iterdir()), "a refused up left state behind"


def test_up_with_a_checkpoint_the_engine_cannot_read_is_a_usage_error(tmp_path: Path) -> None:
    """transformers 5 writes model.safetensors owner-only; the engine runs as its own user and
    would restart until `up` timed out. `up` refuses before anything starts, and says the fix.
    The config is written here (a small Llama's), the weights one tensor."""
    models = tmp_path / "models"
    model = models / "m"
    model.mkdir(parents=True)
    for folder in (models, model):
        folder.chmod(0o755)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "num_hidden_layers": 2,
        "max_position_embeddings": 2048,
        "vocab_size": 512,
        "dtype": "bfloat16",
    }
    (model / "config.json").write_text(json.dumps(config))
    (model / "config.json").chmod(0o644)
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}).encode()
    weights = model / "model.safetensors"
    weights.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    weights.chmod(0o600)
    state = tmp_path / "state"
    result = deploykit("up", "--model", str(model), "--state-dir", str(state))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert f"cannot read the checkpoint {model}: {weights} (mode 0600" in result.stderr
    assert f"chmod -R a+rX {model}" in result.stderr
    assert not state.exists(), "a refused up left state behind"
    assert stack.unreadable_by_engine(model) == [weights]
    weights.chmod(0o644)
    assert stack.unreadable_by_engine(model) == []
    models.chmod(0o700)  # mounted at /models: the engine must enter it
    assert stack.unreadable_by_engine(model) == [models]


def test_bad_stack_name_is_a_usage_error(tmp_path: Path) -> None:
    result = deploykit("ps", "--name", "Not A Name", "--state-dir", str(tmp_path))
    assert result.returncode == 2 and "not a valid stack name" in result.stderr


@pytest.mark.parametrize(
    "projects, why",
    [
        ("team:a", "has a character outside"),  # would break Mosquitto's user:password file
        ("general,deploykit", "is reserved"),  # deploykit/... is the kit's own namespace
        ("general,Deploykit-bridge", "is reserved"),  # the bridge's own account
        ("a/b", "has a character outside"),
        ("general,general", "repeat"),
    ],
)
def test_up_refuses_a_bad_project_name_before_anything_starts(
    tmp_path: Path, projects: str, why: str
) -> None:
    """The one project-name rule (deploykit/names.py), through the CLI: exit 2, the rule as the
    hint, and nothing recorded, generated or started."""
    result = deploykit("up", "--projects", projects, "--name", "x", "--state-dir", str(tmp_path))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert why in result.stderr
    assert "hint:" in result.stderr
    assert not any(tmp_path.iterdir()), "a refused up left state behind"


@pytest.mark.parametrize(
    "args, why",
    [
        (["--role", "boss"], "--role 'boss': all or worker"),
        (["--role", "worker"], "--role worker needs --worker-credentials DIR"),
        (["--broker", "mqtt://h:1883"], "--broker and --worker-credentials are for --role worker"),
        (["--role", "worker", "--worker-credentials", "no-such-bundle"], "has no worker"),
    ],
)
def test_up_refuses_a_wrong_worker_role_before_anything_starts(
    tmp_path: Path, args: list[str], why: str
) -> None:
    result = deploykit("up", *args, "--name", "x", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert why in result.stderr and "hint:" in result.stderr
    assert not (tmp_path / "state").exists(), "a refused up left state behind"


def test_a_worker_bundle_with_a_bad_broker_url_is_refused(tmp_path: Path) -> None:
    from deploykit import credentials
    from deploykit.secrets import WORKER_SECRETS

    bundle = tmp_path / "bundle"
    bundle.mkdir(mode=0o700)
    for name in WORKER_SECRETS:
        (bundle / name).write_text("x\n")
        (bundle / name).chmod(0o600)
    info = {"worker": "w1", "broker_url": "mqtt://h:1883", "redis_url": "redis://h:6380/0"}
    for name in credentials.BUNDLE_INFO:
        (bundle / name).write_text(info.get(name, "general") + "\n")
    result = deploykit(
        "up", "--role", "worker", "--worker-credentials", str(bundle), "--broker", "http://h:1",
        "--name", "x", "--state-dir", str(tmp_path / "state"),
    )  # fmt: skip
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "unsupported broker URL scheme 'http'" in result.stderr
    assert not (tmp_path / "state").exists(), "a refused up left state behind"
