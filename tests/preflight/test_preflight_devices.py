"""deploykit.devices: the recorded H100 inventory, --gpus specs, NVML errors, JSON round trip."""

from __future__ import annotations

import csv
import json
import sys
import types
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from deploykit.devices import (
    DriverInfo,
    GpuInfo,
    GpuInventory,
    dumps_inventory,
    load_inventory,
    read_inventory,
    resolve_gpu_spec,
)
from deploykit.errors import ExitCode, GpuError, UsageError

from .conftest import DATA


def _four(h100: GpuInventory) -> tuple[GpuInfo, ...]:
    g = h100.gpus[0]
    return tuple(
        replace(g, index=i, uuid=f"GPU-{i}{i}{i}{i}aaaa-0000-0000-0000-00000000000{i}")
        for i in range(4)
    )


def test_recorded_h100_is_what_nvidia_smi_said(h100: GpuInventory) -> None:
    (gpu,) = h100.gpus
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.compute_capability == 9.0
    assert gpu.mig_mode is False
    assert h100.driver.driver_version == "580.159.04"
    assert h100.driver.cuda_version == "13.0"
    assert h100.driver.supports_cuda("13.0") and not h100.driver.supports_cuda("13.1")
    assert "recorded" in h100.source and "WRITTEN" not in h100.source
    rows = list(csv.DictReader((DATA / "h100-nvidia-smi.csv").open(), skipinitialspace=True))
    assert len(rows) == 1
    row = rows[0]
    assert resolve_gpu_spec(row["index"], h100.gpus)[0].uuid == row["uuid"]
    assert f"{gpu.compute_capability:.1f}" == row["compute_cap"]
    assert gpu.pci_bus_id == row["pci.bus_id"]
    assert row["memory.total [MiB]"] == f"{gpu.memory_total // 2**20} MiB"


def test_written_inventories_are_marked_written() -> None:
    for name in ("a100-written.json", "t4-written.json", "v100-written.json"):
        assert load_inventory(DATA / name).source.startswith("WRITTEN")


def test_json_round_trip(h100: GpuInventory, tmp_path: Path) -> None:
    path = tmp_path / "inv.json"
    path.write_text(dumps_inventory(h100))
    assert load_inventory(path) == h100
    assert json.loads(path.read_text())["gpus"][0]["uuid"].startswith("GPU-")


def test_bad_inventory_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"gpus": [{"index": 0}], "driver": {"driver_version": "1", "cuda_driver_version": 1}}'
    )
    with pytest.raises(UsageError, match="not a GPU record"):
        load_inventory(bad)
    bad.write_text("[]")
    with pytest.raises(UsageError, match="not a GPU inventory"):
        load_inventory(bad)


# --- --gpus specs ---------------------------------------------------------------------------------


def test_single_number_is_one_gpu_index_not_a_count(h100: GpuInventory) -> None:
    gpus = _four(h100)
    (chosen,) = resolve_gpu_spec("2", gpus)
    assert chosen.index == 2 and chosen.uuid == gpus[2].uuid


def test_indices_uuids_prefixes_all_and_count(h100: GpuInventory) -> None:
    gpus = _four(h100)
    assert [g.index for g in resolve_gpu_spec("0,1", gpus)] == [0, 1]
    assert [g.index for g in resolve_gpu_spec(" 3 , 1 ", gpus)] == [3, 1]
    assert [g.index for g in resolve_gpu_spec(f"{gpus[2].uuid},0", gpus)] == [2, 0]
    assert [g.index for g in resolve_gpu_spec("gpu-1111", gpus)] == [1]
    assert [g.index for g in resolve_gpu_spec("all", gpus)] == [0, 1, 2, 3]
    assert [g.index for g in resolve_gpu_spec("count=2", gpus)] == [0, 1]
    assert [g.index for g in resolve_gpu_spec("count:3", gpus)] == [0, 1, 2]


def test_recorded_uuid_resolves_to_index_zero(h100: GpuInventory) -> None:
    uuid = h100.gpus[0].uuid
    assert resolve_gpu_spec(uuid, h100.gpus)[0].index == 0
    assert resolve_gpu_spec(uuid[:12], h100.gpus)[0].index == 0


def test_missing_gpu_lists_the_gpus_that_exist(h100: GpuInventory) -> None:
    with pytest.raises(GpuError) as err:
        resolve_gpu_spec("2", h100.gpus)
    assert err.value.exit_code == ExitCode.NO_GPU
    assert "no GPU with index 2" in err.value.message
    assert h100.gpus[0].uuid in (err.value.hint or "")


def test_count_looking_index_gets_a_count_hint(h100: GpuInventory) -> None:
    two = _four(h100)[:2]
    with pytest.raises(GpuError) as err:
        resolve_gpu_spec("2", two)
    assert "not a count" in (err.value.hint or "") and "'0,1'" in (err.value.hint or "")


@pytest.mark.parametrize(
    ("spec", "error", "text"),
    [
        ("", UsageError, "empty"),
        ("0,,1", UsageError, "empty item"),
        ("0,0", UsageError, "twice"),
        ("first", UsageError, "cannot read"),
        ("count=0", UsageError, "positive"),
        ("count=5", GpuError, "asks for 5 GPUs"),
        ("GPU-ffff", GpuError, "no GPU has a UUID"),
        ("GPU-", UsageError, "matches 4 GPUs"),
        ("7", GpuError, "no GPU with index 7"),
    ],
)
def test_bad_specs(h100: GpuInventory, spec: str, error: type[Exception], text: str) -> None:
    with pytest.raises(error, match=text):
        resolve_gpu_spec(spec, _four(h100))


# --- NVML edge, with a fake pynvml ----------------------------------------------------------------


class _NVMLError(Exception):
    pass


def _fake_pynvml(*, init_error: bool = False, count: int = 1) -> types.ModuleType:
    m = types.ModuleType("pynvml")
    ns: dict[str, Any] = {
        "NVMLError": _NVMLError,
        "NVML_DEVICE_MIG_ENABLE": 1,
        "nvmlShutdown": lambda: None,
        "nvmlSystemGetDriverVersion": lambda: "535.230.02",
        "nvmlSystemGetCudaDriverVersion": lambda: 12020,
        "nvmlDeviceGetCount": lambda: count,
        "nvmlDeviceGetHandleByIndex": lambda i: i,
        "nvmlDeviceGetCudaComputeCapability": lambda h: (7, 5),
        "nvmlDeviceGetMemoryInfo": lambda h: types.SimpleNamespace(
            total=16 * 2**30, free=15 * 2**30
        ),
        "nvmlDeviceGetUUID": lambda h: f"GPU-t4-{h}",
        "nvmlDeviceGetName": lambda h: b"Tesla T4",
        "nvmlDeviceGetPciInfo": lambda h: types.SimpleNamespace(busId=b"00000000:3B:00.0"),
    }

    def init() -> None:
        if init_error:
            raise _NVMLError("NVML Shared Library Not Found")

    def mig(h: int) -> tuple[int, int]:
        raise _NVMLError("Not Supported")

    ns["nvmlInit"] = init
    ns["nvmlDeviceGetMigMode"] = mig
    for k, v in ns.items():
        setattr(m, k, v)
    return m


def test_read_inventory_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=2))
    inv = read_inventory()
    assert inv.driver == DriverInfo("535.230.02", 12020)
    assert [g.uuid for g in inv.gpus] == ["GPU-t4-0", "GPU-t4-1"]
    g = inv.gpus[0]
    assert (g.name, g.compute_capability, g.mig_mode, g.pci_bus_id) == (
        "Tesla T4",
        7.5,
        None,
        "00000000:3B:00.0",
    )


def test_no_driver_is_a_gpu_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_error=True))
    with pytest.raises(GpuError, match="no NVIDIA driver found") as err:
        read_inventory()
    assert err.value.exit_code == 5 and "nvidia-smi" in (err.value.hint or "")


def test_driver_without_gpus_is_a_gpu_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(count=0))
    with pytest.raises(GpuError, match="reports no GPUs"):
        read_inventory()
