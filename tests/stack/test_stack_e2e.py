"""The cpu stack end to end, on real Docker: build the three images, `deploykit up --wait`, a plain
paho client from the host gets an answer, `deploykit health --json` all ok, `deploykit chat`, and
`deploykit down` leaves no containers, networks or volumes. Secrets never appear in `docker
inspect`, in logs or in the images.
"""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from deploykit import build, render, stack
from deploykit.docker import Docker
from deploykit.errors import CheckFailed
from deploykit.matrix import resolve_target
from deploykit.mqttclient import Credentials, parse_broker_url
from deploykit.mqttclient import request as mqtt_request
from deploykit.secrets import SecretsFolder

from .conftest import WHEELHOUSE, Stopwatch, cli, free_port

pytestmark = pytest.mark.integration

NAME = "dktest-e2e"


@pytest.fixture(scope="session")
def built(docker_api: Docker, timings: Stopwatch) -> list[build.Built]:
    if not WHEELHOUSE.is_dir():
        pytest.skip(f"no vLLM CPU wheelhouse at {WHEELHOUSE} (scripts/provision.sh --tests)")
    results = build.build_images(
        docker_api,
        render.stack_images([resolve_target("none", "cpu")]),
        wheelhouse=WHEELHOUSE,
        progress=lambda line: None,
    )
    for r in results:
        what = "reused" if r.reused else "built"
        timings.mark(f"{r.tag} {what} ({r.size_bytes / 1e9:.2f} GB)", r.seconds)
    return results


def test_images_carry_no_wheelhouse_and_say_what_they_are(
    docker_api: Docker, built: list[build.Built]
) -> None:
    engine, bridge, _broker = (r.tag for r in built)
    labels = docker_api.image_labels(engine)
    assert labels["io.deploykit.gpu-class"] == "cpu" and labels["io.deploykit.quant"] == "none"
    for tag in (engine, bridge):
        out = docker_api.client.containers.run(
            tag,
            # Debian's own ensurepip wheels (python3-venv) are part of the base, not ours.
            entrypoint=[
                "sh",
                "-c",
                "find / -xdev -path /usr/share/python-wheels -prune -o "
                "\\( -name '*.whl' -o -name wheelhouse \\) -print | head",
            ],
            remove=True,
        )
        assert out.decode().strip() == "", f"{tag} keeps wheels: {out!r}"
    history = json.dumps(docker_api.image_history(engine))
    assert "CERTIFICATE" not in history and "token" not in history.lower()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and a broker certificate for 127.0.0.1 signed by it, made here with openssl."""
    d = tmp_path_factory.mktemp("tls")
    files = {k: d / f"{k}.pem" for k in ("ca", "ca-key", "cert", "key", "csr")}
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for cmd in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
         "-keyout", files["ca-key"], "-out", files["ca"]],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
         "-keyout", files["key"], "-out", files["csr"]],
        ["x509", "-req", "-in", files["csr"], "-CA", files["ca"], "-CAkey", files["ca-key"],
         "-CAcreateserial", "-days", "2", "-extfile", d / "san.cnf", "-out", files["cert"]],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, cmd)], check=True, capture_output=True)
    return files


TLS_PORT = free_port()


@pytest.fixture(scope="module")
def running(
    built: list[build.Built],
    tmp_path_factory: pytest.TempPathFactory,
    timings: Stopwatch,
    tls_files: dict[str, Path],
) -> Iterator[stack.StackRecord]:
    state = tmp_path_factory.mktemp("state")
    port = free_port()
    start = time.monotonic()
    up = cli(
        "up",
        "--name",
        NAME,
        "--state-dir",
        str(state),
        "--mqtt-port",
        str(port),
        "--projects",
        "general,maze",
        "--mqtt-tls-cert",
        str(tls_files["cert"]),
        "--mqtt-tls-key",
        str(tls_files["key"]),
        "--mqtt-tls-port",
        str(TLS_PORT),
        "--wait",
        "--timeout",
        "300",
    )
    timings.mark("up -> healthy", time.monotonic() - start)
    try:
        if up.returncode != 0:
            where = ["--name", NAME, "--state-dir", str(state)]
            logs = cli("logs", "--tail", "40", *where)
            pytest.fail(f"deploykit up failed:\n{up.stderr}\n{logs.stdout[-6000:]}")
        yield stack.load_stack(NAME, state)
    finally:
        cli("down", "--name", NAME, "--state-dir", str(state))


def test_tls_listener_answers_with_the_users_certificate(
    running: stack.StackRecord, tls_files: dict[str, Path]
) -> None:
    """The broker's TLS listener serves the certificate given to `up` (verified against its CA,
    host name checked) with the same accounts and ACL; a client that does not trust the CA is
    refused; plain MQTT on the TLS port gets nowhere."""
    folder = SecretsFolder(running.secrets_dir)
    creds = Credentials("general", folder.client_password("general"))
    address = parse_broker_url(f"mqtts://127.0.0.1:{TLS_PORT}", ca_file=tls_files["ca"])
    reply = mqtt_request(address, "general", "hello over TLS", credentials=creds, timeout_s=120)
    assert reply.json()["status"] == "ok"
    untrusted = parse_broker_url(f"mqtts://127.0.0.1:{TLS_PORT}")  # the system's CAs only
    with pytest.raises(CheckFailed, match=r"cannot reach|refused|certificate"):
        mqtt_request(untrusted, "general", "x", credentials=creds, timeout_s=10)
    plain = parse_broker_url(f"mqtt://127.0.0.1:{TLS_PORT}")
    with pytest.raises(CheckFailed):
        mqtt_request(plain, "general", "x", credentials=creds, timeout_s=10)
    assert "PRIVATE KEY" in folder.tls_key_file.read_text()
    assert stat.S_IMODE(folder.tls_key_file.stat().st_mode) == 0o600


def test_plain_paho_client_gets_an_answer(running: stack.StackRecord) -> None:
    """An existing client: MQTT 3.1.1, legacy payload, default reply topic."""
    password = SecretsFolder(running.secrets_dir).client_password("general")
    got = threading.Event()
    replies: list[bytes] = []
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set("general", password)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        replies.append(bytes(msg.payload))
        got.set()

    client.on_message = on_message
    client.connect("127.0.0.1", running.mqtt_port)
    client.loop_start()
    try:
        client.subscribe("general/assistant_response/e2e-1", qos=1)
        time.sleep(0.5)
        client.publish(
            "general/user_input",
            json.dumps({"sessionId": "e2e-1", "message": "Hello there", "maxTokens": 8}),
            qos=1,
        ).wait_for_publish(10)
        assert got.wait(60), "no answer within 60 s"
    finally:
        client.disconnect()
        client.loop_stop()
    assert replies[0].strip(), "empty answer"


def test_health_json_all_ok(running: stack.StackRecord) -> None:
    result = cli("health", "--json", "--name", NAME, "--state-dir", str(running.folder.parent))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [c["check"] for c in report["checks"]] == [
        "broker",
        "engine-container",
        "engine-health",
        "engine-models",
        "engine-completion",
        "bridge-status",
        "bridge-probe",
    ]
    assert all(c["ok"] for c in report["checks"]), report


def test_chat_one_message(running: stack.StackRecord) -> None:
    result = cli(
        "chat",
        "--project",
        "maze",
        "-m",
        "Where is the key?",
        "--max-tokens",
        "8",
        "--name",
        NAME,
        "--state-dir",
        str(running.folder.parent),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip()


def test_chat_reads_lines_until_quit(running: stack.StackRecord) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploykit",
            "chat",
            "--project",
            "general",
            "--session",
            "e2e-chat",
            "--max-tokens",
            "4",
            "--name",
            NAME,
            "--state-dir",
            str(running.folder.parent),
        ],
        input="Hello\nAnd again\n/quit\nnot sent\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "session e2e-chat" in result.stderr and "error" not in result.stderr


def test_secrets_stay_out_of_inspect_and_logs(
    docker_api: Docker, running: stack.StackRecord
) -> None:
    folder = SecretsFolder(running.secrets_dir)
    secrets = [folder.client_password(p) for p in running.projects]
    secrets.append(folder.bridge_credentials()[1])
    for path in (folder.bridge_client_id_file, folder.engine_api_key_file):
        secrets.append(path.read_text().strip())
    containers = docker_api.containers({stack.COMPOSE_PROJECT_LABEL: NAME})
    assert len(containers) == 3
    for c in containers:
        text = json.dumps(docker_api.container_attrs(c.id or "")) + c.logs().decode(
            errors="replace"
        )
        for s in secrets:
            assert s not in text, f"a secret shows in {c.name}'s inspect or logs"


def test_containers_run_hardened(docker_api: Docker, running: stack.StackRecord) -> None:
    """What Docker applied, not what the compose file asked for: a read-only root filesystem, no
    new privileges, all capabilities dropped but the entrypoints' few; the service processes hold
    no capabilities at all once they dropped root."""
    for c in docker_api.containers({stack.COMPOSE_PROJECT_LABEL: NAME}):
        host = docker_api.container_attrs(c.id or "")["HostConfig"]
        assert host["ReadonlyRootfs"] is True, c.name
        assert "no-new-privileges:true" in host["SecurityOpt"], c.name
        assert host["CapDrop"] == ["ALL"], c.name
        assert set(host["CapAdd"]) <= {"CHOWN", "DAC_OVERRIDE", "FOWNER", "SETUID", "SETGID"}
        assert not host.get("Privileged"), c.name
        _rc, out = docker_api.exec(c.id or "", ["sh", "-c", "touch /probe 2>&1; echo rc=$?"])
        assert "rc=0" not in out, f"{c.name}: the root filesystem is writable"
        service = c.top(ps_args="-eo pid,uid,args")["Processes"]
        pids = [p[0] for p in service if p[1] != "0"]  # host pids: read from this host's /proc
        assert pids, c.name
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            cap_eff = next(line for line in status.splitlines() if line.startswith("CapEff"))
            assert cap_eff.split()[-1] == "0000000000000000", f"{c.name} {pid}: {cap_eff}"


def test_engine_api_needs_its_key(docker_api: Docker, running: stack.StackRecord) -> None:
    """The engine's OpenAI API answers only with the stack's key (the bridge and health have it)."""
    engine = docker_api.containers(
        {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: "engine"}
    )[0]
    probe = (
        "import urllib.request as u, urllib.error as e\n"
        "try:\n u.urlopen('http://127.0.0.1:8000/v1/models', timeout=5); print('status 200')\n"
        "except e.HTTPError as x: print('status', x.code)"
    )
    _rc, out = docker_api.exec(engine.id or "", ["python3", "-c", probe])
    assert "status 401" in out, out


def test_services_drop_root(docker_api: Docker, running: stack.StackRecord) -> None:
    for c in docker_api.containers({stack.COMPOSE_PROJECT_LABEL: NAME}):
        top = c.top(ps_args="-eo pid,uid,args")
        # Health checks are exec'd as root for a moment; the services themselves are not root.
        services = [
            p
            for p in top["Processes"]
            if "urllib.request" not in p[2] and "mosquitto_sub" not in p[2]
        ]
        assert services, c.name
        assert all(p[1] != "0" for p in services), f"{c.name} runs as root: {services}"


def test_ps_and_logs(running: stack.StackRecord) -> None:
    where = ["--name", NAME, "--state-dir", str(running.folder.parent)]
    ps = cli("ps", *where)
    assert ps.returncode == 0 and all(s in ps.stdout for s in ("broker", "engine", "bridge"))
    logs = cli("logs", "engine", "--tail", "all", *where)
    assert logs.returncode == 0 and "deploykit guard: starting" in logs.stdout


def test_health_names_the_failed_layer(docker_api: Docker, running: stack.StackRecord) -> None:
    """With the engine stopped, the broker still passes and the engine layer fails (exit 1)."""
    engine = docker_api.containers(
        {stack.COMPOSE_PROJECT_LABEL: NAME, stack.COMPOSE_SERVICE_LABEL: "engine"}
    )[0]
    engine.stop(timeout=5)
    where = ["--name", NAME, "--state-dir", str(running.folder.parent)]
    result = cli("health", "--json", *where)
    assert result.returncode == 1
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert checks["broker"]["ok"] is True
    assert (
        checks["engine-container"]["ok"] is False
        and "exited" in checks["engine-container"]["detail"]
    )
    assert checks["bridge-probe"]["detail"] == "not run: engine-container failed"
    table = cli("health", *where)
    assert table.returncode == 1 and "deploykit logs engine" in table.stderr


def test_down_leaves_nothing(docker_api: Docker, running: stack.StackRecord) -> None:
    result = cli("down", "--name", NAME, "--state-dir", str(running.folder.parent))
    assert result.returncode == 0, result.stdout + result.stderr
    label = {stack.COMPOSE_PROJECT_LABEL: NAME}
    assert docker_api.containers(label) == []
    assert docker_api.networks(label) == []
    assert docker_api.volumes(label) == []


def test_taken_mqtt_port_is_a_clear_error_and_leaves_nothing(
    docker_api: Docker, built: list[build.Built], tmp_path_factory: pytest.TempPathFactory
) -> None:
    name = "dktest-port"
    state = tmp_path_factory.mktemp("state-port")
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        up = cli("up", "--name", name, "--state-dir", str(state), "--mqtt-port", str(port))
    assert up.returncode == 4, up.stderr
    assert f"error: the host port {port} for MQTT is already in use" in up.stderr
    assert "--mqtt-port" in up.stderr
    assert docker_api.containers({stack.COMPOSE_PROJECT_LABEL: name}) == []
    assert docker_api.networks({stack.COMPOSE_PROJECT_LABEL: name}) == []
    cli("down", "--name", name, "--state-dir", str(state))  # the volumes kept for a retry
    assert docker_api.volumes({stack.COMPOSE_PROJECT_LABEL: name}) == []
