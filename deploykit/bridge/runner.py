"""Process entry of the bridge: logging, credentials, config, signals, the event loop (uvloop)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

import uvloop

from deploykit.bridge.config import Settings, load_config
from deploykit.bridge.service import Bridge, Secrets
from deploykit.errors import UsageError
from deploykit.mqttclient import read_credentials, read_secret


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # aiohttp is chatty at debug; user text appears only in our own debug lines
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


async def _main(bridge: Bridge) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await bridge.run(stop)


def read_secrets(settings: Settings) -> Secrets:
    """The bridge's secrets from their files (compose secrets); a missing file is a clear error."""
    client_id = settings.client_id
    if settings.client_id_file is not None:
        client_id = read_secret(settings.client_id_file, "bridge client id")
        if not client_id or any(c in client_id for c in "/+#$ ") or len(client_id) > 128:
            raise UsageError(
                f"the client id in {settings.client_id_file} is empty or has '/', '+', '#', '$'",
                "let `deploykit up` generate it (delete the file to make a new one)",
            )
    share_group = None
    if settings.share_group_file is not None:
        share_group = read_secret(settings.share_group_file, "share group") or None
    api_key = None
    if settings.engine_api_key_file is not None:
        api_key = read_secret(settings.engine_api_key_file, "engine API key") or None
    redis_password = None
    if settings.redis_password_file is not None:
        redis_password = read_secret(settings.redis_password_file, "Redis password") or None
    return Secrets(client_id, share_group, api_key, redis_password)


def run_bridge(settings: Settings) -> None:
    """Run the bridge in the foreground until SIGINT/SIGTERM. Raises DeployKitError on bad
    settings, config or credentials files."""
    setup_logging(settings.log_level)
    config = load_config(settings.config_file)
    credentials = read_credentials(settings.mqtt_username_file, settings.mqtt_password_file)
    bridge = Bridge(settings, config, credentials, read_secrets(settings))
    logging.getLogger("deploykit.bridge").info(
        "bridge %s: projects %s, broker %s, engine %s, user %s",
        settings.name,
        ",".join(settings.projects),
        settings.broker,
        settings.engine,
        credentials.username if credentials else "(anonymous)",
    )
    # Everything made so far (modules, config) lives as long as the process: keep it out of the
    # cyclic garbage collector's full collections, which otherwise walk it again and again.
    gc.collect()
    gc.freeze()
    # libuv's loop: every engine event and MQTT packet is a wake-up of this loop, and uvloop's cost
    # less CPU than asyncio's own (benchmarks/RESULTS.md, "The bridge's event loop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_main(bridge))
