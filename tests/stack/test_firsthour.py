"""A newcomer's first hour, through the CLI against the real cpu stack: stacks found by name from
any folder and listed by `ls`, projects added to a running stack, credentials and their client
snippets, the example clients (streaming, retry by requestId), `top` in a terminal, logs without
health-check noise, a failed `up` that records nothing, a port held by another stack."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploykit import build, stack
from deploykit.docker import Docker

from .conftest import free_port
from .test_stack_e2e import built  # noqa: F401  (the session's images, built once)

pytestmark = pytest.mark.integration

NAME = "dktest-first"
REPO = Path(__file__).resolve().parents[2]
NODE_EXAMPLES = REPO / "examples" / "node"


def cli(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploykit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture(scope="module")
def first(
    built: list[build.Built],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[stack.StackRecord]:
    state = tmp_path_factory.mktemp("first-state")
    up = cli(
        "up", "--name", NAME, "--state-dir", str(state), "--mqtt-port", str(free_port()),
        "--projects", "general", "--wait", "--timeout", "300",
    )  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        assert "next:" in up.stderr and f"chat --project general --name {NAME}" in up.stderr
        assert f"credentials --project general --name {NAME}" in up.stderr
        yield stack.load_stack(NAME, state)
    finally:
        cli("down", "--name", NAME, "--state-dir", str(state))


def test_ls_lists_the_stack_and_name_works_from_any_folder(
    first: stack.StackRecord, tmp_path: Path
) -> None:
    listed = json.loads(cli("ls", "--json", cwd=tmp_path).stdout)
    mine = next(s for s in listed if s["name"] == NAME)
    assert mine["state"] == "3/3 running" and mine["mqtt_port"] == first.mqtt_port
    assert mine["projects"] == ["general"] and mine["folder"] == str(first.folder)
    ps = cli("ps", "--name", NAME, cwd=tmp_path)
    assert ps.returncode == 0 and all(s in ps.stdout for s in ("broker", "engine", "bridge"))
    chat = cli("chat", "--name", NAME, "-m", "Hello", "--max-tokens", "4", cwd=tmp_path)
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
    health = cli("health", "--json", "--name", NAME, cwd=tmp_path)
    assert health.returncode == 0 and json.loads(health.stdout)["ok"] is True
    # no --name in a folder without a stack: an error that names the stacks there are
    here = cli("chat", "-m", "Hello", cwd=tmp_path)
    assert here.returncode == 2 and "this folder has no stack" in here.stderr
    assert NAME in here.stderr and "--name" in here.stderr
    missing = cli("ps", "--name", "dktest-nosuch", cwd=tmp_path)
    assert missing.returncode == 2 and "no stack named 'dktest-nosuch'" in missing.stderr


def test_credentials_json_and_every_snippet_gets_an_answer(
    first: stack.StackRecord, tmp_path: Path
) -> None:
    result = cli("credentials", "--name", NAME, "--project", "general", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["broker"] == f"mqtt://127.0.0.1:{first.mqtt_port}"
    assert info["username"] == "general"
    password_file = Path(info["password_file"])
    password = password_file.read_text().strip()
    assert password_file.stat().st_mode & 0o077 == 0
    text = cli("credentials", "--name", NAME, cwd=tmp_path).stdout
    assert password not in text and password not in result.stdout
    assert str(password_file) in text
    snippets = info["snippets"]
    runs = {
        "mosquitto": (["sh", "snippet.sh"], "snippet.sh"),
        "python": ([sys.executable, "snippet.py"], "snippet.py"),
    }
    if shutil.which("node") and (NODE_EXAMPLES / "node_modules" / "mqtt").is_dir():
        (tmp_path / "node_modules").symlink_to(NODE_EXAMPLES / "node_modules")
        runs["javascript"] = (["node", "snippet.mjs"], "snippet.mjs")
    else:
        pytest.fail("node and examples/node/node_modules are needed: scripts/provision.sh --tests")
    for kind, (cmd, file) in runs.items():
        assert password not in snippets[kind], f"the {kind} snippet holds the password"
        (tmp_path / file).write_text(snippets[kind])
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        seen_password = False
        while proc.poll() is None:  # no process of the snippet has the password in its argv
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    except OSError:
                        continue
                    seen_password |= password.encode() in argv
            time.sleep(0.05)
        out, err = proc.communicate()
        assert proc.returncode == 0, f"{kind}: {out}\n{err}"
        assert not seen_password, f"the {kind} snippet put the password on a command line"
        if kind == "mosquitto":
            reply = json.loads(out)
            assert reply["status"] == "ok" and reply["requestId"] == "demo-1" and reply["text"]
        else:
            assert "[done: " in out and "prompt_tokens" in out, f"{kind}: {out}"


def test_projects_added_to_a_running_stack_can_log_in(
    first: stack.StackRecord, docker_api: Docker, tmp_path: Path
) -> None:
    """`up` again with one more project: the broker keeps running and loads the new account."""
    label = {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: "broker"}
    broker_before = docker_api.containers(label)[0].id
    refused = cli("chat", "--name", NAME, "--project", "maze", "-m", "Hi", cwd=tmp_path)
    assert refused.returncode == 2 and "--projects general,maze" in refused.stderr
    up = cli(
        "up", "--name", NAME, "--state-dir", str(first.folder.parent),
        "--mqtt-port", str(first.mqtt_port), "--projects", "general,maze",
        "--wait", "--timeout", "300",
    )  # fmt: skip
    assert up.returncode == 0, up.stderr
    assert docker_api.containers(label)[0].id == broker_before, "the broker was recreated"
    for project in ("maze", "general"):
        chat = cli("chat", "--name", NAME, "-p", project, "-m", "Hi", "--max-tokens", "4")
        assert chat.returncode == 0 and chat.stdout.strip(), f"{project}: {chat.stderr}"


def test_example_clients_stream_and_retry_with_the_same_request_id(
    first: stack.StackRecord, docker_api: Docker
) -> None:
    env = {
        **os.environ,
        "DEPLOYKIT_PASSWORD_FILE": str(first.secrets_dir / "mqtt_client_general_password"),
    }
    port = ["--port", str(first.mqtt_port)]
    clients = {
        "python": [sys.executable, str(REPO / "examples/python/chat_client.py"), *port],
        "node": ["node", str(NODE_EXAMPLES / "chat-client.mjs"), *port],
    }
    for kind, cmd in clients.items():
        proc = subprocess.run(
            [*cmd, "Hello"], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, f"{kind}: {proc.stderr}"
        assert proc.stdout.strip() and "prompt_tokens" in proc.stderr, f"{kind}: {proc.stderr}"
    # the bridge stops answering for a while: each client retries with the same requestId and
    # gets one answer; the bridge generated it once per request (the repeat came from its cache
    # or was the same request still being answered)
    bridge = docker_api.containers(
        {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: "bridge"}
    )[0]
    for kind, cmd in clients.items():
        # paused before the client starts, and until it has retried at least once: however long
        # the client takes to start, its first attempt goes unanswered
        bridge.pause()
        try:
            proc = subprocess.Popen(
                [*cmd, "--timeout", "2", "--retries", "6", "Are you there?"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stderr is not None
            seen: list[str] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                line = proc.stderr.readline()
                seen.append(line)
                if not line or "retrying with the same requestId" in line:
                    break
        finally:
            bridge.unpause()
        out, rest = proc.communicate(timeout=120)
        err = "".join(seen) + rest
        assert proc.returncode == 0, f"{kind}: {err}"
        assert "retrying with the same requestId" in err, f"{kind}: {err}"
        assert out.strip(), f"{kind}: no answer"


def test_top_in_a_terminal_shows_projects_and_the_engine(first: stack.StackRecord) -> None:
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.fail("tmux is needed (apt-get install tmux; scripts/provision.sh --tests)")
    session = f"dk-top-{os.getpid()}"
    cmd = f"{sys.executable} -m deploykit top --name {NAME} --interval 1 --window 30"
    subprocess.run(
        [tmux, "new-session", "-d", "-s", session, "-x", "140", "-y", "40", cmd],
        check=True,
        cwd=REPO,
    )
    try:
        for _ in range(4):
            chat = cli("chat", "--name", NAME, "-m", "Hello", "--max-tokens", "8")
            assert chat.returncode == 0, chat.stderr
        screen = ""
        for _ in range(20):
            time.sleep(1)
            screen = subprocess.run(
                [tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            rows = [line for line in screen.splitlines() if "│ general" in line]
            if rows and " ms " in rows[0] and "0.00" not in rows[0].split("│")[2]:
                break
        assert f"deploykit top: stack {NAME}" in screen, screen
        assert "projects (bridge)" in screen and "engine (vLLM)" in screen, screen
        assert "KV cache" in screen and "GPU memory: none (cpu stack)" in screen, screen
        general = next(line for line in screen.splitlines() if "│ general" in line)
        cells = [c.strip() for c in general.split("│")[1:-1]]
        assert float(cells[1]) > 0, f"no requests/s while chatting: {general}"
        assert cells[6].endswith(" ms"), f"no p50 latency: {general}"
        assert float(cells[5]) > 0, f"no tokens/s: {general}"
    finally:
        subprocess.run([tmux, "kill-session", "-t", session], check=False)


def test_logs_carry_no_health_check_noise(first: stack.StackRecord) -> None:
    time.sleep(11)  # at least two broker health checks ran
    logs = cli("logs", "broker", "--tail", "all", "--name", NAME)
    assert logs.returncode == 0, logs.stderr
    assert "1884" not in logs.stdout and "127.0.0.1" not in logs.stdout, logs.stdout[-2000:]
    # nor warnings at start (an ACL `pattern` without %u or %c made Mosquitto warn every time)
    assert "warning" not in logs.stdout.lower(), logs.stdout[-2000:]


def test_a_port_of_another_stack_is_refused_naming_it(
    first: stack.StackRecord, tmp_path: Path
) -> None:
    up = cli("up", "--name", "dktest-second", "--state-dir", str(tmp_path),
             "--mqtt-port", str(first.mqtt_port))  # fmt: skip
    assert up.returncode == 2, up.stderr
    assert f"the MQTT port {first.mqtt_port} is taken by the stack '{NAME}'" in up.stderr
    assert "--mqtt-port" in up.stderr and f"deploykit down --name {NAME}" in up.stderr
    assert not (tmp_path / "dktest-second" / "stack.json").exists()


def test_a_failed_up_records_nothing(
    built: list[build.Built],  # noqa: F811
    docker_api: Docker,
    tmp_path: Path,
) -> None:
    name = "dktest-failed"
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = cli("up", "--name", name, "--state-dir", str(tmp_path), "--mqtt-port", str(port))
        assert up.returncode == 4, up.stderr
        assert not (tmp_path / name / "stack.json").exists()
        start = time.monotonic()
        chat = cli("chat", "--name", name, "--state-dir", str(tmp_path), "-m", "Hi", timeout=60)
        assert chat.returncode == 2 and "no stack named 'dktest-failed'" in chat.stderr
        assert time.monotonic() - start < 30
    assert name not in cli("ls").stdout
    label = {stack.COMPOSE_PROJECT_LABEL: name}
    assert docker_api.containers(label) == [] and docker_api.volumes(label) == []


def test_make_passes_the_gpu_class_and_its_hint_says_how() -> None:
    dry = subprocess.run(
        ["make", "-n", "up", "QUANT=fp8", "GPU=2", "GPU_CLASS=cuda-fp8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "deploykit up --quant fp8 --gpus 2 --gpu-class cuda-fp8" in " ".join(dry.split())
    result = cli("up", "--quant", "fp8", "--gpus", "2", "--state-dir", "/nonexistent-state")
    if "NVML is not available" in result.stderr:  # this machine has no NVIDIA driver
        assert result.returncode == 5 and "GPU_CLASS=" in result.stderr and "GPU=" in result.stderr
