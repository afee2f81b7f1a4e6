"""``deploykit serve`` against real parts: this host's Mosquitto, vLLM's CPU build serving a tiny
random-weight model, the bridge; driven and checked through deploykit's own CLI and /proc."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import VLLM_PYTHON, Serve, dk, free_port, group_members

pytestmark = pytest.mark.integration

StartServe = Callable[..., Serve]


@pytest.fixture(scope="module")
def running(start_serve: StartServe) -> Serve:
    s = start_serve("main", "--projects", "general,maze")
    s.wait_serving()
    return s


def secret_values(serve: Serve) -> dict[str, str]:
    """Every secret serve generated: passwords, the client id, the engine's API key."""
    folder = serve.folder / "secrets"
    values = {}
    for path in folder.iterdir():
        if path.name in ("mqtt_users", "mqtt_bridge_username", "hf_token"):
            continue  # made of the others / not secret (the account's name) / empty
        text = path.read_text().strip()
        assert len(text) >= 16, path
        values[path.name] = text
    assert {"engine_api_key", "bridge_client_id", "mqtt_client_general_password"} <= set(values)
    return values


def test_answers_over_mqtt(running: Serve) -> None:
    done = dk("chat", *running.where, "--project", "maze", "-m", "Hello there", "--max-tokens", "8")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_health_passes_with_container_layers_skipped(running: Serve) -> None:
    done = dk("health", *running.where, "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    status = {c["check"]: c["status"] for c in report["checks"]}
    assert status == {
        "serve-processes": "ok",
        "broker": "ok",
        "engine-container": "skip",
        "engine-health": "ok",
        "engine-models": "ok",
        "engine-completion": "ok",
        "bridge-health": "ok",
        "bridge-status": "ok",
        "bridge-probe": "ok",
    }
    skipped = next(c for c in report["checks"] if c["check"] == "engine-container")
    assert "no container" in skipped["detail"]


def test_the_engine_refuses_requests_without_its_key(running: Serve) -> None:
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{running.ports['engine']}/v1/models"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 401


def test_the_record_says_where_the_engine_and_broker_are(running: Serve) -> None:
    record = running.record()
    assert record is not None and record["kind"] == "serve"
    serve = record["serve"]
    assert serve["engine_url"] == f"http://127.0.0.1:{running.ports['engine']}"
    assert serve["broker_url"] == f"mqtt://127.0.0.1:{running.ports['mqtt']}"
    assert serve["vllm_version"] and serve["vllm_python"] == VLLM_PYTHON
    assert set(serve["pids"]) == {"broker", "engine", "bridge"}
    assert Path(serve["engine_api_key_file"]).stat().st_mode & 0o077 == 0


def test_credentials_name_the_file_not_the_password(running: Serve) -> None:
    done = dk("credentials", *running.where, "--project", "general", "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert info["port"] == running.ports["mqtt"]
    password = Path(info["password_file"]).read_text().strip()
    assert password not in done.stdout


def test_secrets_are_in_no_command_line_and_no_log(running: Serve) -> None:
    secrets = secret_values(running)
    pids = [os.getpid(), running.proc.pid, *running.left_behind()]
    assert len(pids) >= 5  # serve, broker, engine (and its workers), bridge
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        for name, value in secrets.items():
            assert value not in cmdline, f"{name} in the command line of {pid}"
    logs = [*running.folder.joinpath("logs").iterdir(), running.output]
    assert {p.name for p in logs} >= {"broker.log", "engine.log", "bridge.log"}
    for log in logs:
        text = log.read_text(errors="replace")
        for name, value in secrets.items():
            assert value not in text, f"{name} in {log}"
        assert log == running.output or log.stat().st_mode & 0o077 == 0


def test_a_taken_port_is_refused_before_anything_starts(
    running: Serve, tmp_path: Path, tiny_model: Path
) -> None:
    done = dk(
        "serve", "--model", str(tiny_model), "--vllm-python", VLLM_PYTHON,
        "--name", "second", "--state-dir", str(tmp_path),
        "--mqtt-port", str(running.ports["mqtt"]),
        "--engine-port", str(free_port()), "--bridge-port", str(free_port()),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"port {running.ports['mqtt']} for the broker is taken" in done.stderr
    assert "--mqtt-port" in done.stderr
    assert not (tmp_path / "second" / "logs").exists()
    assert not (tmp_path / "second" / "stack.json").exists()


def test_sigterm_stops_everything_it_started(running: Serve) -> None:
    running.note_groups()
    assert len(running.pgids) == 3 and running.left_behind()
    running.proc.send_signal(signal.SIGTERM)
    assert running.proc.wait(180) == 0, running.text()
    assert running.left_behind() == []
    assert running.record() is None
    for port in running.ports.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again
    assert running.proc.pid not in group_members(running.proc.pid)


def test_a_child_that_dies_stops_the_rest(start_serve: StartServe, tmp_path: Path) -> None:
    logs = tmp_path / "serve-logs"
    s = start_serve("dies", "--logs", str(logs))
    # the broker is up and vLLM is loading: end the broker as if it crashed
    s.wait_for(lambda: "waiting for vLLM" in s.text(), 300, "the engine to start")
    pids = s.note_groups()
    assert set(pids) == {"broker", "engine"}
    os.kill(pids["broker"], signal.SIGKILL)
    code = s.proc.wait(180)
    assert code == 1, s.text()
    out = s.text()
    assert "broker was killed by signal 9" in out
    assert f"the last lines of {logs / 'broker.log'}" in out
    assert {p.name for p in logs.iterdir()} == {"broker.log", "engine.log"}
    assert s.left_behind() == []  # the engine's whole group went with it
    assert s.record() is None


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--vllm-python", "/nonexistent/python"], "no such program"),
        (["--vllm-python", "/bin/true"], "cannot import vLLM"),
        (["--quant", "awq"], "--quant awq is not supported on GPU class cpu"),
        (["--broker", "mqtt://127.0.0.1:1"], "needs an account on that broker"),
    ],
)
def test_bad_input_is_refused_with_what_to_do(
    serve_parts: None, tiny_model: Path, tmp_path: Path, args: list[str], says: str
) -> None:
    base = ["--vllm-python", VLLM_PYTHON] if "--vllm-python" not in args else []
    done = dk(
        "serve", "--model", str(tiny_model), "--name", "bad", "--state-dir", str(tmp_path),
        "--engine-port", str(free_port()), "--bridge-port", str(free_port()),
        "--mqtt-port", str(free_port()), *base, *args,
    )  # fmt: skip
    assert done.returncode in (2, 3), done.stderr
    assert says in done.stderr
    assert "hint:" in done.stderr
    assert not (tmp_path / "bad" / "stack.json").exists()


@pytest.fixture
def existing_broker(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """Someone else's Mosquitto with one account for the bridge: (port, username file, password
    file)."""
    port = free_port()
    user, password = tmp_path / "user", tmp_path / "password"
    user.write_text("ext-bridge\n")
    password.write_text(f"{uuid.uuid4().hex}\n")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"ext-bridge:{password.read_text().strip()}\n")
    passwd.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True)
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {passwd}\n"
        f"user {pwd.getpwuid(os.getuid()).pw_name}\nlog_dest file {tmp_path}/mosquitto.log\n"
    )
    mosquitto = shutil.which("mosquitto", path=os.environ.get("PATH", "") + ":/usr/sbin")
    assert mosquitto is not None
    proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=subprocess.DEVNULL)
    yield port, user, password
    proc.terminate()
    proc.wait(10)
    assert proc.returncode == 0  # it was still running: serve stopped nothing of it


def test_an_existing_broker_with_an_account_from_files(
    start_serve: StartServe, existing_broker: tuple[int, Path, Path]
) -> None:
    port, user, password = existing_broker
    s = start_serve(
        "ext",
        "--broker", f"mqtt://127.0.0.1:{port}",
        "--mqtt-username-file", str(user),
        "--mqtt-password-file", str(password),
    )  # fmt: skip
    s.wait_serving()
    assert set(s.note_groups()) == {"engine", "bridge"}
    done = dk("health", *s.where, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    broker = next(c for c in json.loads(done.stdout)["checks"] if c["check"] == "broker")
    assert broker["detail"] == f"mqtt://127.0.0.1:{port} accepts account 'ext-bridge'"
    chat = dk("chat", *s.where, "-m", "Hello", "--max-tokens", "4")
    assert chat.returncode == 0, chat.stderr
    refused = dk("credentials", *s.where)
    assert refused.returncode == 2 and "whose accounts are its owner's" in refused.stderr
    secret = password.read_text().strip()
    for pid in [s.proc.pid, *s.left_behind()]:
        with contextlib.suppress(OSError):
            assert secret not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    for log in (s.folder / "logs").iterdir():
        assert secret not in log.read_text(errors="replace")
    s.proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert s.proc.wait(180) == 0, s.text()
    assert s.left_behind() == []


def test_a_killed_serve_leaves_no_server_behind(start_serve: StartServe) -> None:
    """SIGKILL cannot be handled: the kernel sends each process serve started SIGTERM instead."""
    s = start_serve("killed")
    s.wait_for(lambda: "waiting for vLLM" in s.text(), 300, "the engine to start")
    assert set(s.note_groups()) == {"broker", "engine"}
    s.proc.kill()
    s.proc.wait(30)
    deadline = time.monotonic() + 180
    while s.left_behind() and time.monotonic() < deadline:
        time.sleep(1)
    assert s.left_behind() == []
