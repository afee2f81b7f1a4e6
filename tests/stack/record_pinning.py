"""Run on a machine with NVIDIA GPUs: check `--gpus` index -> UUID resolution against nvidia-smi and
record what `deploykit up` would pin.

    PYTHONPATH=. python3 tests/stack/record_pinning.py OUTDIR NAME

Needs nvidia-ml-py, jinja2 and PyYAML only (no Docker). Writes OUTDIR/NAME-pinning.json and exits 1
when a resolution disagrees with nvidia-smi. Recorded results live in tests/stack/data/.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from deploykit import render, stack


def main(out: Path, name: str) -> int:
    smi = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,uuid,pci.bus_id,compute_cap,name",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = [[c.strip() for c in line.split(",")] for line in smi.strip().splitlines()]
    checks = []
    for index, uuid, bus, cc, gpu_name in rows:
        by_index = stack.resolve_gpus(index)
        by_uuid = stack.resolve_gpus(uuid[:12])
        checks.append(
            {
                "nvidia_smi": {
                    "index": index,
                    "uuid": uuid,
                    "pci_bus_id": bus,
                    "compute_cap": cc,
                    "name": gpu_name,
                },
                "resolve_index": list(by_index.device_ids),
                "resolve_uuid_prefix": list(by_uuid.device_ids),
                "compute_capability": by_index.compute_capability,
                "ok": list(by_index.device_ids) == [uuid] == list(by_uuid.device_ids)
                and by_index.compute_capability == float(cc),
            }
        )
    # What `deploykit up --quant fp8 --gpus SPEC` pins: the first GPU, and with several GPUs the
    # last one alone and the first two together (tensor parallel 2).
    specs = {"0": [rows[0][1]]}
    if len(rows) >= 2:
        specs[rows[-1][0]] = [rows[-1][1]]
        specs["0,1"] = [rows[0][1], rows[1][1]]
    ups = {}
    for spec, want in specs.items():
        with tempfile.TemporaryDirectory() as tmp:
            plan = stack.plan_up(stack.UpRequest(quant="fp8", gpus=spec, state_dir=Path(tmp)))
            engine = yaml.safe_load(render.render_compose(plan.cell, plan.options))["services"][
                "engine"
            ]
        devices = engine["deploy"]["resources"]["reservations"]["devices"]
        cmd = engine["command"]
        ups[f"up_fp8_gpus_{spec.replace(',', '_')}"] = {
            "cell": f"{plan.cell.quant} x {plan.cell.gpu_class}",
            "device_ids": devices[0]["device_ids"],
            "tensor_parallel_size": cmd[cmd.index("--tensor-parallel-size") + 1],
            "CUDA_DEVICE_ORDER": engine["environment"]["CUDA_DEVICE_ORDER"],
            "ok": devices[0]["device_ids"] == want
            and cmd[cmd.index("--tensor-parallel-size") + 1] == str(len(want)),
        }
    record = {
        "gpus": checks,
        **ups,
        "ok": all(c["ok"] for c in checks) and all(u["ok"] for u in ups.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-pinning.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: record_pinning.py OUTDIR NAME")
    sys.exit(main(Path(sys.argv[1]), sys.argv[2]))
