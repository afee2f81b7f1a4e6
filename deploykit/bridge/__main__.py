"""``python -m deploykit.bridge``: the bridge with settings from DEPLOYKIT_* environment variables
(DEPLOYKIT_BROKER, DEPLOYKIT_ENGINE, DEPLOYKIT_PROJECTS, DEPLOYKIT_BRIDGE_CONFIG, DEPLOYKIT_CLIENT_ID,
DEPLOYKIT_HTTP_PORT, DEPLOYKIT_MQTT_USERNAME_FILE, DEPLOYKIT_MQTT_PASSWORD_FILE, DEPLOYKIT_LOG_LEVEL)."""

from __future__ import annotations

import sys

from deploykit.bridge.config import settings_from
from deploykit.bridge.runner import run_bridge
from deploykit.errors import DeployKitError


def main() -> int:
    try:
        run_bridge(settings_from())
    except DeployKitError as err:
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"hint: {err.hint}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
