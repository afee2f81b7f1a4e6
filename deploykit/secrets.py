"""The stack's secrets folder: MQTT accounts and the Hugging Face token, generated on first use.

Files (each mode 0600, the folder 0700), mounted into the stack as compose secrets, never passed
on a command line or baked into an image:

- ``mqtt_users``: plaintext ``user:password`` lines the broker hashes at start;
- ``mqtt_bridge_username``, ``mqtt_bridge_password``: the bridge's account;
- ``mqtt_client_<project>_password``: one client account per project (username = project name);
- ``bridge_client_id``: the bridge's MQTT client id; its sessions are ``<id>-<project>``. Secret
  because stock Mosquitto lets any account connect with any client id and take that session over;
- ``bridge_share_group``: the shared-subscription group of the bridge's replicas (secret: an account
  that knows it can subscribe to ``$share/<group>/...`` and take part of the requests);
- ``engine_api_key``: the engine's OpenAI API key (``VLLM_API_KEY``), for the bridge and health;
- ``redis_password``: the password of the Redis that replicas share their session state in;
- ``hf_token``: a Hugging Face token for gated models (empty unless you put one there);
- ``mqtt_tls_cert``, ``mqtt_tls_key``: copies of the certificate and key of the broker's TLS
  listener, when ``up`` was given them.

Existing files are kept (so passwords stay stable across ``up``); a new project gets a new account.
"""

from __future__ import annotations

import os
import secrets as _random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from deploykit import names
from deploykit.errors import DeployKitError, UsageError

BRIDGE_USERNAME = "deploykit-bridge"
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class SecretsFolder:
    """A generated secrets folder; read passwords through it, never print them."""

    path: Path

    @property
    def users_file(self) -> Path:
        return self.path / "mqtt_users"

    @property
    def bridge_username_file(self) -> Path:
        return self.path / "mqtt_bridge_username"

    @property
    def bridge_password_file(self) -> Path:
        return self.path / "mqtt_bridge_password"

    @property
    def hf_token_file(self) -> Path:
        return self.path / "hf_token"

    @property
    def bridge_client_id_file(self) -> Path:
        return self.path / "bridge_client_id"

    @property
    def bridge_share_group_file(self) -> Path:
        return self.path / "bridge_share_group"

    @property
    def engine_api_key_file(self) -> Path:
        return self.path / "engine_api_key"

    @property
    def redis_password_file(self) -> Path:
        return self.path / "redis_password"

    @property
    def tls_cert_file(self) -> Path:
        return self.path / "mqtt_tls_cert"

    @property
    def tls_key_file(self) -> Path:
        return self.path / "mqtt_tls_key"

    def client_password_file(self, project: str) -> Path:
        return self.path / f"mqtt_client_{project}_password"

    def client_password(self, project: str) -> str:
        path = self.client_password_file(project)
        try:
            return path.read_text().strip()
        except FileNotFoundError as exc:
            raise UsageError(
                f"no MQTT account for project {project!r} in {self.path}",
                f"start the stack with that project: deploykit up --projects {project}",
            ) from exc

    def bridge_credentials(self) -> tuple[str, str]:
        return (
            self.bridge_username_file.read_text().strip(),
            self.bridge_password_file.read_text().strip(),
        )


def _new_password() -> str:
    return _random.token_urlsafe(24)


def _new_id() -> str:
    """A secret that also is a valid MQTT client id or share group: hex only."""
    return "dk" + _random.token_hex(16)


def _write_private(path: Path, text: str) -> None:
    """Create or replace a file that only its owner can read, without a readable moment."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)


def _read_or_create(path: Path, make: str) -> str:
    if path.is_file():
        os.chmod(path, FILE_MODE)
        return path.read_text().strip()
    _write_private(path, make + "\n")
    return make


def copy_tls(folder: SecretsFolder, cert: Path, key: Path) -> None:
    """Copy the broker's TLS certificate and key into the secrets folder (owner-only)."""
    for src, dst, what in (
        (cert, folder.tls_cert_file, "certificate"),
        (key, folder.tls_key_file, "key"),
    ):
        try:
            text = src.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"cannot read the TLS {what} {src}: {getattr(exc, 'strerror', None) or exc}",
                "pass PEM files: --mqtt-tls-cert CERT.pem --mqtt-tls-key KEY.pem",
            ) from exc
        if "-----BEGIN" not in text:
            raise UsageError(
                f"the TLS {what} {src} is not a PEM file", "pass PEM files (-----BEGIN ...)"
            )
        _write_private(dst, text)


#: What a worker host's bridges need from the broker host (``deploykit credentials --worker``):
#: the bridge's MQTT account, the secret client id its sessions are named by, the share group,
#: and the password of the Redis the replicas share.
WORKER_SECRETS = (
    "mqtt_bridge_username",
    "mqtt_bridge_password",
    "bridge_client_id",
    "bridge_share_group",
    "redis_password",
)


def copy_private(files: Sequence[tuple[Path, Path]]) -> None:
    """Copy files (source, destination), each owner-only, the destination's folder too."""
    for src, dst in files:
        dst.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(dst.parent, DIR_MODE)
        try:
            text = src.read_text()
        except OSError as exc:
            raise UsageError(
                f"cannot read {src}: {exc.strerror}",
                "copy the whole worker bundle that `deploykit credentials --worker NAME` wrote",
            ) from exc
        _write_private(dst, text)


def ensure_secrets(folder: Path, projects: Sequence[str]) -> SecretsFolder:
    """Create what is missing in ``folder`` for these projects; returns the folder."""
    names.check_project_names(tuple(projects))
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        os.chmod(folder, DIR_MODE)
        username = _read_or_create(folder / "mqtt_bridge_username", BRIDGE_USERNAME)
        bridge_password = _read_or_create(folder / "mqtt_bridge_password", _new_password())
        accounts = {username: bridge_password}
        for project in sorted(set(projects)):
            accounts[project] = _read_or_create(
                folder / f"mqtt_client_{project}_password", _new_password()
            )
        # Accounts of projects from earlier runs stay valid, so their clients keep working.
        for path in sorted(folder.glob("mqtt_client_*_password")):
            name = path.name[len("mqtt_client_") : -len("_password")]
            if names.project_name_problem(name) is None:  # e.g. a file left by an older kit
                accounts.setdefault(name, path.read_text().strip())
        users = "".join(f"{user}:{password}\n" for user, password in sorted(accounts.items()))
        users_file = folder / "mqtt_users"
        if not users_file.is_file():
            _write_private(users_file, users)
        elif users_file.read_text() != users:
            # In place (same inode): a running broker sees it through its bind-mounted secret.
            with users_file.open("w") as f:
                f.write(users)
        _read_or_create(folder / "bridge_client_id", _new_id())
        _read_or_create(folder / "bridge_share_group", _new_id())
        _read_or_create(folder / "engine_api_key", _new_password())
        _read_or_create(folder / "redis_password", _new_password())
        hf_token = folder / "hf_token"
        if not hf_token.is_file():
            _write_private(hf_token, "")  # empty: no token (gated models need one here)
        os.chmod(hf_token, FILE_MODE)
    except OSError as exc:
        raise DeployKitError(
            f"cannot write the secrets folder {folder}: {exc.strerror}",
            "check its permissions, or pick another one with --secrets-dir",
        ) from exc
    return SecretsFolder(folder)
