"""The layers only a ``deploykit serve`` instance has: its processes, and the bridge's ``/health``
(which a compose stack does not publish)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from deploykit.checks import CheckResult, failed, ok
from deploykit.health.layers import Layer
from deploykit.serve.record import ServeState


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # there, but another user's
    return True


class _ServeLayer(Layer):
    @property
    def serve(self) -> ServeState:
        assert self.target.record.serve is not None
        return self.target.record.serve


class ServeProcessesCheck(_ServeLayer):
    """The serve process and each process it started are running."""

    name = "serve-processes"
    hint = "see the logs in the serve instance's logs folder, and start `deploykit serve` again"

    def run(self) -> CheckResult:
        serve = self.serve
        gone = [
            name
            for name, pid in {"serve": serve.supervisor_pid, **serve.pids}.items()
            if not _alive(pid)
        ]
        if gone:
            return failed(self.name, f"not running: {', '.join(gone)} (logs: {serve.logs_dir})")
        running = ", ".join(f"{n} {p}" for n, p in sorted(serve.pids.items()))
        return ok(self.name, f"serve {serve.supervisor_pid}: {running or 'starting'}")


class BridgeHttpCheck(_ServeLayer):
    """The bridge's ``/health`` answers 200 (connected to the broker and the engine)."""

    name = "bridge-health"
    hint = "see bridge.log in the serve instance's logs folder"

    def run(self) -> CheckResult:
        url = f"{self.serve.bridge_url}/health"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                status, text = response.status, response.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            status, text = err.code, err.read().decode(errors="replace")
        except OSError as err:
            return failed(self.name, f"GET {url}: {err}")
        if status != 200:
            return failed(self.name, f"GET {url}: {status} {text[:200]}")
        return ok(self.name, f"GET {url}: 200")
