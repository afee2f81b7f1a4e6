#!/usr/bin/env python3
"""deploykit start-up guard for the none x cuda-fp8 engine image.

Runs before vLLM, as the image's ENTRYPOINT:
  1. refuses, with a clear message, a GPU this method cannot run on (names the GPU found and the
     methods that would run on it), or a container that sees no GPU at all;
  2. checks a local checkpoint against the method (config.json quantization_config);
  3. picks float16 instead of bfloat16 on GPUs below compute capability 8.0;
  4. copies its secrets (an HF token) to a private place, drops root, and execs the vLLM server.
Standard library only. Exit codes: 3 unsupported GPU, 5 no GPU visible, 6 checkpoint mismatch.
"""

import json
import os
import shutil
import subprocess
import sys

FACTS = json.loads("{\"alternatives\": [[7.5, \"none\", \"cuda\"], [7.5, \"fp8\", \"cuda\"], [7.5, \"awq\", \"cuda\"], [7.5, \"gptq\", \"cuda\"], [7.5, \"bitsandbytes\", \"cuda\"], [8.9, \"none\", \"cuda-fp8\"], [8.9, \"fp8\", \"cuda-fp8\"], [8.9, \"awq\", \"cuda-fp8\"], [8.9, \"gptq\", \"cuda-fp8\"], [8.9, \"bitsandbytes\", \"cuda-fp8\"]], \"bf16_min_compute_capability\": 8.0, \"checkpoint_quant_methods\": [], \"dtype_below_bf16\": null, \"gpu_class\": \"cuda-fp8\", \"min_compute_capability\": 8.9, \"online_quant_args\": [], \"quant\": \"none\", \"quant_methods\": {\"awq\": \"awq\", \"awq_marlin\": \"awq\", \"bitsandbytes\": \"bitsandbytes\", \"fp8\": \"fp8\", \"gptq\": \"gptq\", \"gptq_marlin\": \"gptq\"}, \"requires_prequantized\": false, \"runtime_uid\": 10001, \"serve\": [\"vllm\", \"serve\"], \"vllm_args\": [\"--dtype\", \"bfloat16\"]}")
SECRETS_DIR = "/run/secrets"
PRIVATE_DIR = "/run/deploykit"


def fail(code, message, hint):
    sys.stderr.write(f"deploykit guard: error: {message}\ndeploykit guard: hint: {hint}\n")
    sys.exit(code)


def log(message):
    sys.stderr.write(f"deploykit guard: {message}\n")


def visible_gpus():
    """(name, compute capability) of every GPU this container sees."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            gpus = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else name
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                gpus.append((name, float(f"{major}.{minor}")))
            return gpus
        finally:
            pynvml.nvmlShutdown()
    except Exception as err:  # no pynvml, or no driver
        log(f"NVML not usable ({err.__class__.__name__}); asking nvidia-smi")
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, _, cc = line.rpartition(",")
        gpus.append((name.strip(), float(cc.strip())))
    return gpus


def methods_on(cc):
    """Methods that run on a GPU of this compute capability, and the image class to use."""
    fitting = [(min_cc, q, c) for min_cc, q, c in FACTS["alternatives"] if min_cc <= cc]
    if not fitting:
        return "none (vLLM's CUDA images need compute capability 7.5 or newer; use the cpu image)", None
    best = max(min_cc for min_cc, _, _ in fitting)
    return ", ".join(q for m, q, _ in fitting if m == best), next(c for m, _, c in fitting if m == best)


def check_gpus():
    gpus = visible_gpus()
    if not gpus:
        fail(
            5,
            f"no NVIDIA GPU is visible in this container, and the {FACTS['quant']} x {FACTS['gpu_class']} "
            "engine needs one",
            "start it with GPUs (deploykit up --gpus ...; compose device_ids), and check that the NVIDIA "
            "container runtime is installed (deploykit doctor)",
        )
    need = FACTS["min_compute_capability"]
    for name, cc in gpus:
        if cc < need:
            fits, cls = methods_on(cc)
            where = f" (use the {cls} images)" if cls else ""
            fail(
                3,
                f"quantization method {FACTS['quant']} in the {FACTS['gpu_class']} image needs compute "
                f"capability >= {need:.1f}, but this container sees {name} (compute capability {cc:.1f})",
                f"methods that run on {name}: {fits}{where}",
            )
    for name, cc in gpus:
        log(f"GPU {name} (compute capability {cc:.1f}) can run {FACTS['quant']}")
    return min(cc for _, cc in gpus)


def arg_value(args, flag):
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def checkpoint_method(model):
    """How a local checkpoint is quantized: (description, method name or None).

    method is "" for an unquantized checkpoint and None for a quantization no deploykit method
    covers; (None, None) when the checkpoint cannot be read (not a local folder).
    """
    if not model or not os.path.isdir(model):
        return None, None
    try:
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None, None
    q = config.get("quantization_config") or config.get("compression_config")
    if isinstance(q, dict):
        raw = str(q.get("quant_method") or "compressed-tensors").lower()
        if raw == "compressed-tensors":
            groups = [g.get("weights") or {} for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
            w = groups[0] if groups else {}
            if w.get("num_bits") == 8 and str(w.get("type", "")).lower() == "float":
                return "quantized with FP8 (compressed-tensors)", "fp8"
            return f"quantized with compressed-tensors ({w.get('type', '?')} {w.get('num_bits', '?')}-bit)", None
        if raw == "modelopt":
            algo = str(q.get("quant_algo", "")).upper()
            return f"quantized with NVIDIA ModelOpt {algo}", "fp8" if algo.startswith("FP8") else None
        return f"quantized with {raw}", FACTS["quant_methods"].get(raw)
    try:
        with open(os.path.join(model, "hf_quant_config.json")) as f:
            algo = str(json.load(f).get("quantization", {}).get("quant_algo", "")).upper()
        return f"quantized with NVIDIA ModelOpt {algo}", "fp8" if algo.startswith("FP8") else None
    except (OSError, ValueError):
        return "not quantized (bf16/fp16 weights)", ""


def check_checkpoint(args, fixed):
    model = arg_value(args, "--model")
    what, method = checkpoint_method(model)
    quant = FACTS["quant"]
    if what is None:
        log(f"checkpoint check skipped: {model!r} is not a local folder with a config.json")
        return fixed
    if method == quant:
        if FACTS["online_quant_args"]:
            log(f"checkpoint is already {what}: vLLM detects it, so the on-the-fly flags are dropped")
            online = FACTS["online_quant_args"]
            for i in range(len(fixed) - len(online) + 1):
                if fixed[i : i + len(online)] == online:
                    return fixed[:i] + fixed[i + len(online) :]
        return fixed
    if method is None:
        fail(6, f"--quant {quant} was asked for, but {model} is {what}, which no deploykit method serves",
             "use a checkpoint that is unquantized, or quantized with awq, gptq, fp8 or bitsandbytes")
    if FACTS["requires_prequantized"]:
        fail(
            6,
            f"--quant {quant} needs a checkpoint quantized with {quant}, but {model} is {what}",
            "use a pre-quantized checkpoint of this method, or pick the method that fits this one"
            + (f" (it runs with --quant {method})" if method else " (none, fp8 or bitsandbytes)"),
        )
    if method:
        fail(
            6,
            f"--quant {quant} was asked for, but {model} is {what}",
            f"serve it with --quant {method}, or use an unquantized checkpoint for {quant}",
        )
    return fixed


def with_dtype(fixed, cc):
    if FACTS["dtype_below_bf16"] and cc < FACTS["bf16_min_compute_capability"] and "--dtype" in fixed:
        fixed = list(fixed)
        fixed[fixed.index("--dtype") + 1] = FACTS["dtype_below_bf16"]
        log(f"compute capability {cc:.1f} has no bfloat16: using --dtype {FACTS['dtype_below_bf16']}")
    return fixed


def take_secrets_and_drop_root():
    """Copy readable secrets to a private folder for the runtime user, then become that user."""
    uid = FACTS["runtime_uid"]
    token = os.path.join(SECRETS_DIR, "hf_token")
    if os.geteuid() != 0:
        if os.path.isfile(token) and os.access(token, os.R_OK):
            os.environ["HF_TOKEN_PATH"] = token
        return
    os.makedirs(PRIVATE_DIR, mode=0o700, exist_ok=True)
    os.chown(PRIVATE_DIR, uid, uid)
    if os.path.isfile(token) and os.path.getsize(token) > 0:
        private = os.path.join(PRIVATE_DIR, "hf_token")
        shutil.copyfile(token, private)
        os.chown(private, uid, uid)
        os.chmod(private, 0o600)
        os.environ["HF_TOKEN_PATH"] = private
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    os.environ["HOME"] = os.environ.get("DEPLOYKIT_HOME", "/home/vllm")


def main(argv):
    args = argv[1:]
    fixed = list(FACTS["vllm_args"])
    if FACTS["gpu_class"] != "cpu":
        fixed = with_dtype(fixed, check_gpus())
    fixed = check_checkpoint(args, fixed)
    take_secrets_and_drop_root()
    command = FACTS["serve"] + fixed + args
    log("starting: " + " ".join(command))
    try:
        os.execvp(command[0], command)
    except OSError as err:
        fail(
            1,
            f"cannot start the vLLM server ({command[0]}: {err.strerror})",
            "the image's BASE_IMAGE must contain vLLM (the official vllm/vllm-openai image, or the "
            "cpu image's own build stage)",
        )


if __name__ == "__main__":
    main(sys.argv)
