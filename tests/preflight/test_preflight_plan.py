"""deploykit.plan: the estimator against known figures, checkpoint detection and refusals, profiles,
and the gate fed with the recorded H100 inventory and written A100 / T4 / V100 cases."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from deploykit.devices import GIB, DriverInfo, GpuInventory
from deploykit.errors import GpuError, ModelError, UnsupportedError, UsageError
from deploykit.matrix import GpuClass, Quant, resolve_target
from deploykit.plan import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    Status,
    check_checkpoint,
    gate,
    make_plan,
    methods_for_checkpoint,
    parse_length,
    read_model,
)

from .conftest import (
    LLAMA3_8B,
    LLAMA3_8B_FP8_CT,
    QWEN25_7B,
    QWEN25_7B_AWQ,
    QWEN25_7B_GPTQ,
    QWEN25_32B,
)

MakeModel = Callable[..., Path]


# --- the estimator --------------------------------------------------------------------------------


def test_qwen25_32b_kv_and_weights(make_model: MakeModel) -> None:
    m = read_model(make_model(QWEN25_32B))
    # 2 x 64 layers x 8 KV heads x 128 head_dim x 2 bytes = 256 KiB a token
    assert m.kv_bytes_per_token() == 256 * 1024
    assert m.kv_bytes_per_token(kv_dtype="fp8") == 128 * 1024
    assert m.kv_bytes_per_token(tp=2) == 128 * 1024
    # 32.8B parameters (the model card says 32.5B non-embedding + embeddings) -> about 65 GB in bf16
    assert m.params == pytest.approx(32.76e9, rel=0.01)
    assert m.weights_bytes(Quant.NONE) / 1e9 == pytest.approx(65.5, abs=1.0)
    assert not m.checkpoint.quantized and m.checkpoint.description == "unquantized bfloat16"


def test_llama3_8b_weights_match_vllms_load_log(make_model: MakeModel) -> None:
    m = read_model(make_model(LLAMA3_8B))
    # vLLM logs "Loading model weights took 14.96 GB" (GiB) for Meta-Llama-3-8B in bf16.
    assert m.weights_bytes(Quant.NONE) / GIB == pytest.approx(14.96, abs=0.05)
    # 2 x 32 x 8 x 128 x 2 = 128 KiB a token
    assert m.kv_bytes_per_token() == 128 * 1024
    assert m.max_position_embeddings == 8192


def test_quantized_weights_keep_embeddings_in_bf16(make_model: MakeModel) -> None:
    m = read_model(make_model(LLAMA3_8B))
    bf16, fp8, nf4 = (m.weights_bytes(q) for q in (Quant.NONE, Quant.FP8, Quant.BITSANDBYTES))
    embeddings = 2 * 128256 * 4096 * 2  # embed_tokens + lm_head, bf16
    assert fp8 == pytest.approx((bf16 - embeddings) / 2 + embeddings, rel=0.01)
    # Real Llama-3-8B has a 128k vocabulary, so its bf16 embeddings are a larger share than in the
    # Llama-3-8B-shaped model of docs/facts.md, "Measured throughput" (fp8/bf16 = 0.52 there): FP8 ~8.5 GiB,
    # NF4 ~5.6 GiB (vLLM 0.24 logged 8.5 and 5.62 GiB for this shape on an H200: estimator_h200.json).
    assert fp8 / GIB == pytest.approx(8.46, abs=0.05)
    assert nf4 / GIB == pytest.approx(5.61, abs=0.05)


def test_awq_checkpoint_estimate_matches_its_size_on_the_hub(make_model: MakeModel) -> None:
    m = read_model(make_model(QWEN25_7B_AWQ))
    assert m.checkpoint.method is Quant.AWQ
    assert m.checkpoint.description == "AWQ 4-bit, group 128"
    assert m.weights_bytes(Quant.AWQ) / 1e9 == pytest.approx(
        5.58, rel=0.03
    )  # 5.58 GB of safetensors
    assert m.kv_bytes_per_token() == 2 * 28 * 4 * 128 * 2


def test_kv_heads_are_rounded_up_per_gpu(make_model: MakeModel) -> None:
    m = read_model(make_model(QWEN25_7B_AWQ))  # 4 KV heads
    assert m.kv_bytes_per_token(tp=8) == 2 * 28 * 1 * 128 * 2  # replicated, not 0.5 a GPU


def test_safetensors_headers_give_exact_sizes(make_model: MakeModel) -> None:
    tiny = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 1,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "max_position_embeddings": 512,
    }
    tensors = {
        "model.embed_tokens.weight": ("BF16", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight": ("BF16", [64, 64]),
        "model.layers.0.mlp.up_proj.weight": ("BF16", [128, 64]),
        "model.layers.0.input_layernorm.weight": ("BF16", [64]),
        "lm_head.weight": ("BF16", [100, 64]),
    }
    m = read_model(make_model(tiny, tensors=tensors))
    assert m.safetensors_bytes == 2 * (100 * 64 * 2 + 64 * 64 + 128 * 64 + 64)
    assert m.linear_params == 64 * 64 + 128 * 64
    assert m.other_params == 100 * 64 * 2 + 64


def test_broken_safetensors_header_is_a_model_error(make_model: MakeModel) -> None:
    path = make_model(LLAMA3_8B)
    (path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ModelError, match="safetensors header"):
        read_model(path)


def test_a_folder_that_is_no_model_is_a_usage_error(tmp_path: Path) -> None:
    """No config.json, a file, or nothing at all: the --model given is wrong (exit 2), which is
    not a checkpoint that does not match (exit 6)."""
    with pytest.raises(UsageError, match=r"no config\.json") as err:
        read_model(tmp_path)
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="does not exist"):
        read_model(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a model folder"):
        read_model(tmp_path / "file")


@pytest.mark.parametrize(
    ("text", "value"),
    [("8192", 8192), ("32k", 32000), ("32K", 32768), ("auto", None), (None, None)],
)
def test_parse_length(text: str | None, value: int | None) -> None:
    assert parse_length(text) == value


def test_parse_length_rejects_garbage() -> None:
    with pytest.raises(UsageError):
        parse_length("long")


# --- checkpoint detection and refusals ------------------------------------------------------------


def test_detects_each_checkpoint_kind(make_model: MakeModel) -> None:
    gptq = read_model(make_model(QWEN25_7B_GPTQ)).checkpoint
    assert (gptq.method, gptq.bits, gptq.group_size) == (Quant.GPTQ, 4, 128)
    ct = read_model(make_model(LLAMA3_8B_FP8_CT)).checkpoint
    assert (ct.quant_method, ct.method) == ("compressed-tensors", Quant.FP8)
    modelopt = read_model(
        make_model(LLAMA3_8B, hf_quant_config={"quantization": {"quant_algo": "FP8"}})
    ).checkpoint
    assert (modelopt.quant_method, modelopt.method) == ("modelopt", Quant.FP8)
    nvfp4 = read_model(
        make_model(LLAMA3_8B, hf_quant_config={"quantization": {"quant_algo": "NVFP4"}})
    ).checkpoint
    assert nvfp4.quantized and nvfp4.method is None
    bnb = read_model(
        make_model(
            {
                **LLAMA3_8B,
                "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
            }
        )
    ).checkpoint
    assert bnb.method is Quant.BITSANDBYTES and bnb.description == "bitsandbytes 4-bit"
    old_ct = read_model(
        make_model({**LLAMA3_8B, "compression_config": LLAMA3_8B_FP8_CT["quantization_config"]})
    ).checkpoint
    assert old_ct.method is Quant.FP8


def test_methods_that_fit_each_checkpoint(make_model: MakeModel) -> None:
    bf16 = read_model(make_model(LLAMA3_8B)).checkpoint
    assert methods_for_checkpoint(bf16) == [Quant.NONE, Quant.FP8, Quant.BITSANDBYTES]
    awq = read_model(make_model(QWEN25_7B_AWQ)).checkpoint
    assert methods_for_checkpoint(awq) == [Quant.AWQ]


def test_awq_on_unquantized_is_refused_naming_what_fits(make_model: MakeModel) -> None:
    m = read_model(make_model(LLAMA3_8B))
    with pytest.raises(ModelError) as err:
        check_checkpoint(Quant.AWQ, m)
    assert "unquantized bfloat16" in err.value.message
    assert "pre-quantized AWQ" in err.value.message
    assert "none, fp8, bitsandbytes" in (err.value.hint or "")


def test_awq_on_gptq_checkpoint_is_refused(make_model: MakeModel) -> None:
    m = read_model(make_model(QWEN25_7B_GPTQ))
    with pytest.raises(ModelError, match=r"already quantized \(GPTQ 4-bit, group 128\)") as err:
        check_checkpoint(Quant.AWQ, m)
    assert err.value.hint == "methods that fit this checkpoint: gptq"


def test_none_on_quantized_checkpoint_is_refused(make_model: MakeModel) -> None:
    with pytest.raises(ModelError, match="already quantized"):
        check_checkpoint(Quant.NONE, read_model(make_model(QWEN25_7B_AWQ)))


# --- profiles -------------------------------------------------------------------------------------


def test_h100_plan_for_qwen32b_puts_fp8_first(make_model: MakeModel, h100: GpuInventory) -> None:
    plan = make_plan(read_model(make_model(QWEN25_32B)), h100.gpus)
    best = plan.best
    assert best is not None
    assert (best.quant, best.tensor_parallel_size, best.kv_cache_dtype) == (Quant.FP8, 1, "fp8")
    assert best.status is Status.COMPATIBLE and best.max_model_len_fit == 32768
    statuses = [p.status for p in plan.profiles]
    assert statuses == sorted(
        statuses, key=[Status.COMPATIBLE, Status.LOW_MEMORY, Status.INCOMPATIBLE].index
    )
    awq = next(p for p in plan.profiles if p.quant is Quant.AWQ)
    assert awq.status is Status.INCOMPATIBLE and "pre-quantized" in awq.reason
    js = plan.to_json()["profiles"][0]
    for key in (
        "quant",
        "tensor_parallel_size",
        "kv_cache_dtype",
        "status",
        "reason",
        "weights_gib",
        "kv_gib_per_1k_tokens",
        "max_model_len_fit",
    ):
        assert key in js


def test_low_memory_suggests_the_largest_length_that_fits(
    make_model: MakeModel, h100: GpuInventory
) -> None:
    long_ctx = {**QWEN25_32B, "max_position_embeddings": 131072}
    plan = make_plan(
        read_model(make_model(long_ctx)), h100.gpus, quant="none", kv_cache_dtype="auto"
    )
    (p,) = plan.profiles
    assert p.status is Status.LOW_MEMORY
    budget = 79.6474609375 * 0.92 - 65.53e9 / GIB - 1.5  # GiB for KV on the recorded H100
    assert p.max_model_len_fit == pytest.approx(budget * GIB / (256 * 1024), abs=16)
    assert f"--max-model-len {p.max_model_len_fit}" in p.reason
    assert p.max_model_len_fit is not None and p.max_model_len_fit % 16 == 0


def test_too_big_is_incompatible_with_reason(make_model: MakeModel, t4: GpuInventory) -> None:
    plan = make_plan(read_model(make_model(QWEN25_32B)), t4.gpus)
    assert plan.best is None
    none = next(p for p in plan.profiles if p.quant is Quant.NONE)
    assert none.status is Status.INCOMPATIBLE and "does not fit" in none.reason


def test_a100_pair_lists_tensor_parallel_and_prefers_bf16(
    make_model: MakeModel, a100: GpuInventory
) -> None:
    plan = make_plan(read_model(make_model(QWEN25_32B)), a100.gpus, max_model_len=32768)
    assert plan.best is not None and plan.best.quant is Quant.NONE  # no FP8 speed-up below CC 8.9
    tp2 = [
        p for p in plan.profiles if p.tensor_parallel_size == 2 and p.status is Status.COMPATIBLE
    ]
    assert tp2 and all("--tensor-parallel-size" in p.vllm_args for p in tp2)
    assert all(
        p.weights_gib_per_gpu == pytest.approx(p.weights_gib / 2) for p in tp2 if p.weights_gib
    )


def test_heads_that_do_not_split_are_incompatible(
    make_model: MakeModel, a100: GpuInventory
) -> None:
    odd = {**LLAMA3_8B, "num_attention_heads": 25, "num_key_value_heads": 5, "head_dim": 128}
    plan = make_plan(read_model(make_model(odd)), a100.gpus, quant="none", tensor_parallel_size=2)
    assert (
        plan.profiles[0].status is Status.INCOMPATIBLE and "do not split" in plan.profiles[0].reason
    )


def test_gpu_busy_with_something_else(make_model: MakeModel, h100: GpuInventory) -> None:
    busy = (replace(h100.gpus[0], memory_free=40 * GIB),)
    plan = make_plan(read_model(make_model(LLAMA3_8B)), busy, quant="fp8")
    assert plan.best is None
    assert "--gpu-memory-utilization 0.5" in plan.profiles[0].reason


def test_plan_with_quant_refuses_mismatch(make_model: MakeModel, h100: GpuInventory) -> None:
    with pytest.raises(ModelError):
        make_plan(read_model(make_model(QWEN25_7B_AWQ)), h100.gpus, quant="gptq")
    with pytest.raises(UnsupportedError, match="removed"):
        make_plan(read_model(make_model(QWEN25_7B)), h100.gpus, quant="squeezellm")


# --- the gate: recorded H100, written Ampere / Turing / Volta -------------------------------------


def test_gate_fp8_on_recorded_h100_passes(make_model: MakeModel, h100: GpuInventory) -> None:
    result = gate("fp8", gpus=h100.gpus, driver=h100.driver, model=make_model(QWEN25_7B))
    assert result.ok and result.profile is not None
    assert result.profile.kv_cache_dtype == "fp8"  # the cuda-fp8 engine sets --kv-cache-dtype fp8


def test_gate_takes_the_cell_the_command_resolved(h100: GpuInventory) -> None:
    cell = resolve_target("fp8", "cuda-fp8")
    by_cell = gate(cell, gpus=h100.gpus, driver=h100.driver)
    assert by_cell.ok and by_cell.cell is cell
    by_name = gate("fp8", gpus=h100.gpus, driver=h100.driver)
    assert by_name.cell == cell and by_name.profile == by_cell.profile
    with pytest.raises(UnsupportedError, match="class cuda-fp8, not cuda"):
        gate(resolve_target("fp8", "cuda"), gpus=h100.gpus)


def test_gate_every_method_that_fits_runs_on_h100(h100: GpuInventory) -> None:
    for q in ("none", "fp8", "awq", "gptq", "bitsandbytes"):
        assert gate(q, gpus=h100.gpus, driver=h100.driver).ok


def test_gate_cuda_image_on_h100_is_refused(h100: GpuInventory) -> None:
    with pytest.raises(UnsupportedError, match="class cuda-fp8, not cuda"):
        gate("fp8", gpu_class=GpuClass.CUDA, gpus=h100.gpus)


def test_gate_ampere_old_driver_proposes_cu129(a100: GpuInventory) -> None:
    with pytest.raises(GpuError) as err:
        gate("none", gpus=a100.gpus, driver=a100.driver)
    assert "CUDA 12.8" in err.value.message
    assert "-cu129" in (err.value.hint or "")
    new_driver = DriverInfo("580.65.06", 13000)
    assert gate("fp8", gpus=a100.gpus, driver=new_driver).ok  # weight-only FP8 runs on Ampere


def test_gate_fp8_image_class_on_ampere_is_refused(a100: GpuInventory) -> None:
    with pytest.raises(UnsupportedError, match="is class cuda, not cuda-fp8"):
        gate("fp8", gpu_class="cuda-fp8", gpus=a100.gpus)


def test_gate_turing_runs_awq_but_qwen32b_does_not_fit(
    make_model: MakeModel, t4: GpuInventory
) -> None:
    assert gate("awq", gpus=t4.gpus, driver=DriverInfo("580.65.06", 13000)).ok
    with pytest.raises(ModelError, match="does not fit"):
        gate("fp8", gpus=t4.gpus, model=make_model(QWEN25_32B))


def test_gate_turing_low_memory_names_the_length(make_model: MakeModel, t4: GpuInventory) -> None:
    model = make_model({**LLAMA3_8B, "max_position_embeddings": 65536})
    # FP8 weights ~8.5 GiB + 1.5 overhead of 13.8 usable leave ~3.8 GiB: ~31k tokens at 128 KiB each
    with pytest.raises(ModelError, match=r"max_model_len 65536 needs") as err:
        gate("fp8", gpus=t4.gpus, model=model)
    assert err.value.hint is not None and err.value.hint.startswith("use --max-model-len ")
    fit = int(err.value.hint.split()[-1])
    assert 30000 < fit < 33000
    assert gate("fp8", gpus=t4.gpus, model=model, max_model_len=fit).ok
    with pytest.raises(ModelError):
        gate("fp8", gpus=t4.gpus, model=model, max_model_len=fit + 16)


def test_gate_volta_is_refused(v100: GpuInventory) -> None:
    with pytest.raises(UnsupportedError, match="compute capability 7"):
        gate("none", gpus=v100.gpus)


def test_gate_mismatch_and_force(make_model: MakeModel, h100: GpuInventory) -> None:
    model = make_model(LLAMA3_8B)
    with pytest.raises(ModelError, match="pre-quantized AWQ"):
        gate("awq", gpus=h100.gpus, model=model)
    forced = gate("awq", gpus=h100.gpus, model=model, force=True)
    assert not forced.ok and forced.warnings and "pre-quantized AWQ" in forced.warnings[0]


def test_gate_collects_every_problem(make_model: MakeModel, a100: GpuInventory) -> None:
    mig = tuple(replace(g, mig_mode=True) for g in a100.gpus)
    result = gate("awq", gpus=mig, driver=a100.driver, model=make_model(LLAMA3_8B), force=True)
    kinds = {type(p) for p in result.problems}
    assert kinds == {GpuError, ModelError} and len(result.problems) == 3  # driver, MIG, checkpoint
    with pytest.raises(GpuError, match="also: "):
        gate("awq", gpus=mig, driver=a100.driver, model=make_model(LLAMA3_8B))


def test_gate_without_gpus_checks_method_and_checkpoint(make_model: MakeModel) -> None:
    assert gate("none", gpu_class="cpu").ok
    with pytest.raises(UnsupportedError):
        gate("awq", gpu_class="cpu")
    with pytest.raises(ModelError):
        gate("gptq", gpu_class="cuda", model=make_model(QWEN25_7B_AWQ))


def test_default_utilization_is_vllms() -> None:
    assert DEFAULT_GPU_MEMORY_UTILIZATION == 0.92


def test_gate_with_a_hub_id_notes_what_it_did_not_check(h100: GpuInventory) -> None:
    result = gate("awq", gpus=h100.gpus, driver=h100.driver, model="Qwen/Qwen2.5-7B-Instruct-AWQ")
    assert result.ok and result.profile is None
    assert "not a local directory" in result.notes[0]


def test_incomplete_download_is_a_model_error(make_model: MakeModel) -> None:
    path = make_model(LLAMA3_8B)
    weight_map = {
        "a.weight": "model-00001-of-00002.safetensors",
        "b.weight": "model-00002-of-00002.safetensors",
    }
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelError, match="2 of 2 safetensors shards are missing"):
        read_model(path)
