"""One error family for the whole kit.

Every refusal says what was asked, why it cannot be done, and what to do instead (the hint).
The CLI catches ``DeployKitError`` in one place, prints ``error: …`` and ``hint: …`` and exits
with the error's exit code.
"""

from __future__ import annotations


class ExitCode:
    """Exit codes of the ``deploykit`` command. Documented in the README."""

    OK = 0
    FAILED = 1  # a check ran and failed (render --check, health, doctor)
    USAGE = 2  # bad arguments: unknown method, GPU class, malformed spec
    UNSUPPORTED = 3  # a valid request the kit refuses: unsupported cell, method the GPU cannot run
    DOCKER = 4  # Docker daemon, compose or the NVIDIA runtime missing or failing
    NO_GPU = 5  # no NVIDIA driver / NVML, or the requested GPUs do not exist
    MODEL = 6  # the model/checkpoint does not match the request or does not fit


class DeployKitError(Exception):
    """Base class: a message (what went wrong) and a hint (what to do)."""

    exit_code: int = ExitCode.FAILED

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class UsageError(DeployKitError):
    """The request itself is malformed or names something that does not exist."""

    exit_code = ExitCode.USAGE


class UnsupportedError(DeployKitError):
    """A well-formed request the kit refuses, e.g. a matrix cell vLLM cannot run."""

    exit_code = ExitCode.UNSUPPORTED


class CheckFailed(DeployKitError):
    """A check ran and did not pass (render --check, health, doctor)."""

    exit_code = ExitCode.FAILED


class DockerError(DeployKitError):
    """Docker, compose or the NVIDIA container runtime is missing or failed."""

    exit_code = ExitCode.DOCKER


class GpuError(DeployKitError):
    """No NVIDIA driver/NVML, or the GPUs asked for are not there."""

    exit_code = ExitCode.NO_GPU


class ModelError(DeployKitError):
    """The checkpoint does not match the requested method, or does not fit the GPUs."""

    exit_code = ExitCode.MODEL
