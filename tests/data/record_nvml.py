"""Record real NVML output on a GPU machine as test data (needs only nvidia-ml-py + deploykit.devices).

Run from the repository root:  PYTHONPATH=. python3 tests/data/record_nvml.py OUTDIR [NAME]
Writes OUTDIR/NAME-nvml.json (what `deploykit gpus --json` prints), OUTDIR/nvidia-smi.csv,
OUTDIR/nvidia-smi-L.txt, and prints a comparison of resolve_gpu_spec's index -> UUID with nvidia-smi.
"""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from deploykit.devices import dumps_inventory, read_inventory, resolve_gpu_spec

SMI_FIELDS = "index,uuid,name,compute_cap,memory.total,pci.bus_id,driver_version"


def main() -> int:
    out = Path(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "h100"
    out.mkdir(parents=True, exist_ok=True)
    inv = read_inventory()
    when = datetime.now(UTC).strftime("%Y-%m-%d")
    gpu_names = ", ".join(sorted({g.name for g in inv.gpus}))
    inv = replace(
        inv,
        source=f"recorded {when} with tests/data/record_nvml.py on {len(inv.gpus)}x {gpu_names}, "
        f"driver {inv.driver.driver_version} (CUDA {inv.driver.cuda_version})",
    )
    (out / f"{name}-nvml.json").write_text(dumps_inventory(inv))
    print(dumps_inventory(inv))

    smi_csv = subprocess.run(
        ["nvidia-smi", f"--query-gpu={SMI_FIELDS}", "--format=csv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (out / "nvidia-smi.csv").write_text(smi_csv)
    smi_l = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    (out / "nvidia-smi-L.txt").write_text(smi_l)
    print(smi_csv)
    print(smi_l)

    rows = list(csv.DictReader(io.StringIO(smi_csv), skipinitialspace=True))
    ok = True
    for row in rows:
        row = {k.strip(): v for k, v in row.items()}
        idx = row["index"].strip()
        (gpu,) = resolve_gpu_spec(idx, inv.gpus)
        (by_uuid,) = resolve_gpu_spec(row["uuid"].strip()[:12], inv.gpus)
        checks = {
            "uuid": (gpu.uuid, row["uuid"].strip()),
            "compute_cap": (f"{gpu.compute_capability:.1f}", row["compute_cap"].strip()),
            "pci.bus_id": (gpu.pci_bus_id.lower(), row["pci.bus_id"].strip().lower()),
            "driver": (inv.driver.driver_version, row["driver_version"].strip()),
            "uuid-prefix->index": (str(by_uuid.index), idx),
        }
        for key, (mine, smi) in checks.items():
            same = mine == smi
            ok &= same
            print(
                f"--gpus {idx}: {key}: deploykit={mine!r} nvidia-smi={smi!r} {'MATCH' if same else 'DIFFER'}"
            )
        print(
            f"--gpus {idx}: memory.total nvidia-smi={next((v for k, v in row.items() if k.startswith('memory.total')), '?')!r} nvml={gpu.memory_total / 2**20:.0f} MiB"
        )
    print("count=1 ->", [g.index for g in resolve_gpu_spec("count=1", inv.gpus)])
    print("all ->", [g.index for g in resolve_gpu_spec("all", inv.gpus)])
    try:  # what a CUDA context costs, for plan's overhead figure (torch is there on the GPU machine)
        import torch

        before = inv.gpus[0].memory_free
        free, _total = torch.cuda.mem_get_info(0)
        print(
            f"torch sees {torch.cuda.get_device_name(0)}; CUDA context took {(before - free) / 2**20:.0f} MiB;"
            f" torch uuid {torch.cuda.get_device_properties(0).uuid}"
        )
    except Exception as err:
        print("torch check skipped:", err)
    print("ALL MATCH" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
