"""`deploykit up` runs the pre-flight gate (deploykit.plan.gate) before anything starts.

GPU inventories: tests/data/h100-nvml.json (recorded on a real H100) and a100-written.json (written
by hand, marked so in its `source`). Checkpoints: config.json files written here (no weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from deploykit import devices, stack
from deploykit.errors import GpuError, ModelError, UsageError
from deploykit.render import render_compose

DATA = Path(__file__).resolve().parent.parent / "data"

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "torch_dtype": "bfloat16",
}


def checkpoint(tmp_path: Path, name: str = "llama-8b", **extra: object) -> Path:
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**LLAMA_8B, **extra}))
    return folder


def test_up_refuses_a_checkpoint_that_is_not_what_the_method_needs(tmp_path: Path) -> None:
    inv = devices.load_inventory(DATA / "h100-nvml.json")
    model = checkpoint(tmp_path)
    with pytest.raises(ModelError) as err:
        stack.plan_up(
            stack.UpRequest(quant="awq", gpus="0", model=str(model), state_dir=tmp_path),
            inventory=inv.gpus,
            driver=inv.driver,
        )
    assert err.value.exit_code == 6
    assert "awq" in err.value.message and "unquantized" in err.value.message


def test_force_turns_the_refusal_into_a_warning_and_mounts_the_checkpoint(tmp_path: Path) -> None:
    inv = devices.load_inventory(DATA / "h100-nvml.json")
    model = checkpoint(tmp_path)
    warnings: list[str] = []
    plan = stack.plan_up(
        stack.UpRequest(quant="awq", gpus="0", model=str(model), state_dir=tmp_path, force=True),
        inventory=inv.gpus,
        driver=inv.driver,
        warn=warnings.append,
    )
    assert any(w.startswith("--force: going ahead although") for w in warnings)
    engine = yaml.safe_load(render_compose(plan.cell, plan.options))["services"]["engine"]
    assert f"{model.parent}:/models:ro" in engine["volumes"]
    cmd = engine["command"]
    assert cmd[cmd.index("--model") + 1] == "/models/llama-8b"
    assert plan.served_model_name == "llama-8b"


def test_up_fits_a_bf16_8b_model_on_the_recorded_h100(tmp_path: Path) -> None:
    inv = devices.load_inventory(DATA / "h100-nvml.json")
    plan = stack.plan_up(
        stack.UpRequest(quant="fp8", gpus="0", model=str(checkpoint(tmp_path)), state_dir=tmp_path),
        inventory=inv.gpus,
        driver=inv.driver,
    )
    assert plan.options.gpu_ids == (inv.gpus[0].uuid,)


def test_up_refuses_a_driver_too_old_for_the_image(tmp_path: Path) -> None:
    inv = devices.load_inventory(DATA / "a100-written.json")  # written: R570, CUDA 12.8
    with pytest.raises(GpuError) as err:
        stack.plan_up(
            stack.UpRequest(quant="fp8", gpus="0", state_dir=tmp_path),
            inventory=inv.gpus,
            driver=inv.driver,
        )
    assert "-cu129" in (err.value.hint or "")


def test_up_pins_what_was_recorded_on_two_real_h100s(tmp_path: Path) -> None:
    """Replays tests/stack/data/h100x2-pinning.json (recorded with record_pinning.py on 2 H100s)
    through plan_up, fed the NVML inventory recorded on the same machine."""
    inv = devices.load_inventory(DATA / "h100x2-nvml.json")
    recorded = json.loads((Path(__file__).parent / "data" / "h100x2-pinning.json").read_text())
    ups = {
        k.removeprefix("up_fp8_gpus_").replace("_", ","): v
        for k, v in recorded.items()
        if k.startswith("up_")
    }
    assert set(ups) == {"0", "1", "0,1"}
    for spec, want in ups.items():
        plan = stack.plan_up(
            stack.UpRequest(quant="fp8", gpus=spec, state_dir=tmp_path),
            inventory=inv.gpus,
            driver=inv.driver,
        )
        engine = yaml.safe_load(render_compose(plan.cell, plan.options))["services"]["engine"]
        assert (
            engine["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            == want["device_ids"]
        )
        cmd = engine["command"]
        assert cmd[cmd.index("--tensor-parallel-size") + 1] == want["tensor_parallel_size"]


def test_up_options_reach_the_engine_and_the_bridge(tmp_path: Path) -> None:
    inv = devices.load_inventory(DATA / "h100-nvml.json")
    config = tmp_path / "bridge.yaml"
    config.write_text("projects:\n  maze:\n    system_prompt: You guide a player through a maze.\n")
    plan = stack.plan_up(
        stack.UpRequest(
            quant="fp8",
            gpus="0",
            model=str(checkpoint(tmp_path)),
            state_dir=tmp_path,
            max_model_len=4096,
            gpu_memory_utilization=0.8,
            reasoning_parser="deepseek_r1",
            bridge_config=config,
        ),
        inventory=inv.gpus,
        driver=inv.driver,
    )
    services = yaml.safe_load(render_compose(plan.cell, plan.options))["services"]
    cmd = services["engine"]["command"]
    assert cmd[cmd.index("--max-model-len") + 1] == "4096"
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.8"
    assert cmd[cmd.index("--reasoning-parser") + 1] == "deepseek_r1"
    assert f"{config}:/etc/deploykit/bridge.yaml:ro" in services["bridge"]["volumes"]
    assert (
        services["bridge"]["environment"]["DEPLOYKIT_BRIDGE_CONFIG"] == "/etc/deploykit/bridge.yaml"
    )


def test_a_bad_bridge_config_is_refused_before_anything_starts(tmp_path: Path) -> None:
    config = tmp_path / "bridge.yaml"
    config.write_text("defaults:\n  default_max_tokens: lots\n")
    with pytest.raises(UsageError, match="default_max_tokens"):
        stack.plan_up(stack.UpRequest(state_dir=tmp_path, bridge_config=config), inventory=[])


def test_a_context_too_long_for_the_gpu_is_refused_with_the_length_that_fits(
    tmp_path: Path,
) -> None:
    inv = devices.load_inventory(DATA / "h100-nvml.json")
    # Llama-3-8B shape: 128 KiB of bf16 KV per token, so a million tokens need 128 GiB
    model = checkpoint(tmp_path, max_position_embeddings=1048576)
    with pytest.raises(ModelError) as err:
        stack.plan_up(
            stack.UpRequest(
                quant="none", gpus="0", model=str(model), state_dir=tmp_path, max_model_len=1048576
            ),
            inventory=inv.gpus,
            driver=inv.driver,
        )
    assert err.value.hint is not None and err.value.hint.startswith("use --max-model-len ")
    fits = int(err.value.hint.removeprefix("use --max-model-len "))
    assert 100_000 < fits < 1048576
    stack.plan_up(
        stack.UpRequest(
            quant="none", gpus="0", model=str(model), state_dir=tmp_path, max_model_len=fits
        ),
        inventory=inv.gpus,
        driver=inv.driver,
    )
