"""Kubernetes manifests (`deploykit render --k8s`): golden files compared whole, every resource
validated against the Kubernetes schemas (kubernetes-validate, strict), the GPU-class node
affinity checked against the matrix, and the secrets the pods read checked against what the
kustomization generates. No cluster is involved: nothing here was applied to one."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploykit import k8s, matrix
from deploykit.errors import UsageError

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "k8s"

#: The cases the issue names: the cpu stack, fp8 on an FP8-native GPU, and engines of two GPUs
#: (two replicas of them, so Redis and the share group are in).
CASES = {
    "none-cpu": ("none", "cpu", k8s.K8sOptions()),
    "fp8-cuda-fp8": ("fp8", "cuda-fp8", k8s.K8sOptions(projects=("general", "maze"))),
    "none-cuda-fp8-2x2gpu": (
        "none",
        "cuda-fp8",
        k8s.K8sOptions(
            replicas=2,
            gpus_per_replica=2,
            projects=("general", "maze"),
            registry="ghcr.io/example/deploykit",
        ),
    ),
}


def rendered(case: str) -> dict[str, str]:
    quant, cls, options = CASES[case]
    return k8s.render_k8s(matrix.resolve_target(quant, cls), options).as_dict()


def documents(files: dict[str, str]) -> list[dict]:
    docs = []
    for name, text in files.items():
        if name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.mark.parametrize("case", CASES)
def test_manifests_match_golden(case: str, update_golden: bool) -> None:
    files = rendered(case)
    folder = GOLDEN / case
    if update_golden:
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.yaml"):
            old.unlink()
        for name, text in files.items():
            (folder / name).write_text(text)
    on_disk = {p.name: p.read_text() for p in folder.glob("*.yaml")}
    assert on_disk == files, f"{folder} differs; run pytest --update-golden if intended"


@pytest.mark.parametrize("version", k8s.VALIDATED_VERSIONS)
@pytest.mark.parametrize("case", CASES)
def test_every_resource_validates_against_the_kubernetes_schema(case: str, version: str) -> None:
    docs = documents(rendered(case))
    kinds = sorted(d["kind"] for d in docs)
    assert {"Deployment", "StatefulSet", "Service", "NetworkPolicy"} <= set(kinds), kinds
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any problem


def test_the_validation_would_catch_a_wrong_manifest() -> None:
    """The schema check is not vacuous: a misspelled field and a wrong type are refused."""
    engine = next(d for d in documents(rendered("none-cpu")) if d["kind"] == "Deployment")
    typo = copy.deepcopy(engine)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    wrong_type = copy.deepcopy(engine)
    wrong_type["spec"]["replicas"] = "two"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, k8s.VALIDATED_VERSIONS[-1], strict=True)


def test_gpu_engines_ask_for_their_gpus_and_cpu_for_none() -> None:
    for case, gpus in (("none-cpu", None), ("fp8-cuda-fp8", 1), ("none-cuda-fp8-2x2gpu", 2)):
        docs = documents(rendered(case))
        engine = next(d for d in docs if d["metadata"]["name"] == "deploykit-engine")
        container = engine["spec"]["template"]["spec"]["containers"][0]
        limits = container["resources"].get("limits", {})
        assert limits.get(k8s.GPU_RESOURCE) == gpus, case
        if gpus:
            args = container["args"]
            assert args[args.index("--tensor-parallel-size") + 1] == str(gpus)


def test_readiness_is_a_completion_and_liveness_the_health_endpoint() -> None:
    docs = documents(rendered("fp8-cuda-fp8"))
    engine = next(d for d in docs if d["kind"] == "Deployment")
    container = engine["spec"]["template"]["spec"]["containers"][0]
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    ready = " ".join(container["readinessProbe"]["exec"]["command"])
    assert "/v1/completions" in ready and "'max_tokens': 1" in ready
    assert "/run/secrets/engine_api_key" in ready  # the key is read from the file, not the text


def satisfies(term: k8s.Term, labels: dict[str, str]) -> bool:
    def one(label: str, operator: str, values: tuple[str, ...]) -> bool:
        have = labels.get(label)
        if have is None:
            return False
        if operator == "In":
            return have in values
        if operator == "Gt":
            return int(have) > int(values[0])
        if operator == "Lt":
            return int(have) < int(values[0])
        raise AssertionError(operator)

    return all(one(*e) for e in term.expressions)


@pytest.mark.parametrize("cls", [matrix.GpuClass.CUDA, matrix.GpuClass.CUDA_FP8])
def test_node_affinity_selects_exactly_the_gpu_class(cls: matrix.GpuClass) -> None:
    terms = k8s.compute_capability_terms(cls)
    for major in range(5, 13):
        for minor in range(10):
            labels = {k8s.CC_MAJOR_LABEL: str(major), k8s.CC_MINOR_LABEL: str(minor)}
            try:
                expected = matrix.gpu_class_for(major + minor / 10) is cls
            except Exception:
                expected = False
            assert any(satisfies(t, labels) for t in terms) == expected, (major, minor)


def test_pods_read_only_the_secrets_the_kustomization_generates() -> None:
    for case in CASES:
        files = rendered(case)
        kustomization = yaml.safe_load(files["kustomization.yaml"])
        generated = {
            s["name"]: {f.split("=", 1)[0] for f in s["files"]}
            for s in kustomization["secretGenerator"]
        }
        listed = set(kustomization["resources"])
        assert listed == set(files) - {"kustomization.yaml"}, case
        for doc in documents(files):
            if doc["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = doc["spec"]["template"]["spec"]
            volumes = {v["name"]: v for v in pod["volumes"]}
            secret = volumes["secrets"]["secret"]["secretName"]
            assert secret in generated, (case, secret)
            for container in pod["containers"]:
                for env in container.get("env", []):
                    value = env.get("value", "")
                    if env["name"].endswith("_FILE"):
                        key = value.removeprefix("/run/secrets/")
                        assert key in generated[secret], (case, env["name"])
                    assert "password" not in env["name"].lower() or env["name"].endswith("_FILE")


def test_replicas_share_state_only_when_there_are_several() -> None:
    one = rendered("fp8-cuda-fp8")
    two = rendered("none-cuda-fp8-2x2gpu")
    assert "redis.yaml" not in one and "DEPLOYKIT_REDIS" not in one["bridge.yaml"]
    assert "DEPLOYKIT_SHARE_GROUP_FILE" not in one["bridge.yaml"]
    assert "redis.yaml" in two and "DEPLOYKIT_REDIS" in two["bridge.yaml"]
    bridge = next(d for d in documents(two) if d["metadata"]["name"] == "deploykit-bridge")
    assert bridge["kind"] == "StatefulSet" and bridge["spec"]["replicas"] == 2
    assert all(
        d["spec"]["template"]["spec"]["containers"][0]["image"].startswith(
            "ghcr.io/example/deploykit/"
        )
        for d in documents(two)
        if d["kind"] in ("Deployment", "StatefulSet")
    )


def test_an_external_broker_leaves_the_broker_out() -> None:
    files = k8s.render_k8s(
        matrix.resolve_target("none", "cpu"), k8s.K8sOptions(broker="mqtts://mq.example:8883")
    ).as_dict()
    assert "broker.yaml" not in files
    assert '"mqtts://mq.example:8883"' in files["bridge.yaml"]


def test_refusals() -> None:
    with pytest.raises(UsageError):
        k8s.K8sOptions(replicas=0)
    with pytest.raises(UsageError):
        k8s.render_k8s(matrix.resolve_target("none", "cpu"), k8s.K8sOptions(gpus_per_replica=2))


def test_cli_writes_manifests_and_owner_only_secrets(tmp_path: Path) -> None:
    out = tmp_path / "k8s"
    result = subprocess.run(
        [sys.executable, "-m", "deploykit", "render", "--k8s", "--quant", "fp8",
         "--gpu-class", "cuda-fp8", "--projects", "general,maze", "--out", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_text() for p in out.glob("*.yaml")} == rendered("fp8-cuda-fp8")
    secrets = out / "secrets"
    assert oct(secrets.stat().st_mode & 0o777) == "0o700"
    for path in secrets.iterdir():
        assert oct(path.stat().st_mode & 0o777) == "0o600", path
        if path.name.endswith(("_password", "_client_id", "_share_group", "_api_key")):
            assert path.read_text().strip() not in "".join(rendered("fp8-cuda-fp8").values())
    bad = subprocess.run(
        [sys.executable, "-m", "deploykit", "render", "--k8s", "--quant", "fp8",
         "--gpu-class", "cpu", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert bad.returncode == 3, bad.stderr  # fp8 on cpu is refused as unsupported
