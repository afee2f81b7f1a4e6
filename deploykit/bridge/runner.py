"""Process entry of the bridge: logging, credentials, config, signals, the asyncio loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from deploykit.bridge.config import Settings, load_config
from deploykit.bridge.service import Bridge
from deploykit.mqttclient import read_credentials


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # paho and httpx are chatty at debug; user text appears only in our own debug lines
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


async def _main(bridge: Bridge) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await bridge.run(stop)


def run_bridge(settings: Settings) -> None:
    """Run the bridge in the foreground until SIGINT/SIGTERM. Raises DeployKitError on bad
    settings, config or credentials files."""
    setup_logging(settings.log_level)
    config = load_config(settings.config_file)
    credentials = read_credentials(settings.mqtt_username_file, settings.mqtt_password_file)
    bridge = Bridge(settings, config, credentials)
    logging.getLogger("deploykit.bridge").info(
        "bridge %s: projects %s, broker %s, engine %s, user %s",
        settings.client_id,
        ",".join(settings.projects),
        settings.broker,
        settings.engine,
        credentials.username if credentials else "(anonymous)",
    )
    asyncio.run(_main(bridge))
