"""The one place that names the project's container images (components and the launcher read it).

A reference is ``<registry>/<name>:<tag>``:

- registry: ``$MIXGRPO_IMAGE_REGISTRY``, else :data:`DEFAULT_REGISTRY` (a placeholder: set it);
- name: :data:`IMAGES` (``mixgrpo-runtime``, ``mixgrpo-trainer``, ``mixgrpo-evaluator``);
- tag: ``$MIXGRPO_IMAGE_TAG``, else the git commit of the checkout (12 hex digits; the images are
  built and pushed with that tag, see images/README.md), else ``v<package version>``.

``$MIXGRPO_IMAGE_<KEY>`` (``RUNTIME`` / ``TRAINER`` / ``EVALUATOR``) replaces one whole reference,
e.g. to pin a digest: ``MIXGRPO_IMAGE_TRAINER=registry/mixgrpo-trainer@sha256:...``.
The images set ``MIXGRPO_IMAGE_TAG`` to the commit they were built from, so code running inside
an image resolves the same tag without git.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REGISTRY_ENV = "MIXGRPO_IMAGE_REGISTRY"
TAG_ENV = "MIXGRPO_IMAGE_TAG"
DEFAULT_REGISTRY = "registry.example.com/mixgrpo"
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


@dataclass(frozen=True)
class Image:
    key: str  # short name used in code: "runtime", "trainer", "evaluator"
    name: str  # repository name under the registry
    dockerfile: str  # relative to the repository root (the build context)
    purpose: str


IMAGES: dict[str, Image] = {
    image.key: image
    for image in (
        Image("runtime", "mixgrpo-runtime", "images/runtime/Dockerfile",
              "CPU pipeline steps: prepare-prompts, cache-rewards, the TrainJob launcher, register, promote; MLflow server"),
        Image("trainer", "mixgrpo-trainer", "images/trainer/Dockerfile",
              "CUDA multi-node MixGRPO training (torchrun / accelerate, DeepSpeed, FSDP) inside the TrainJob"),
        Image("evaluator", "mixgrpo-evaluator", "images/evaluator/Dockerfile",
              "GPU evaluation with the reward models (HPS, PickScore, ImageReward, CLIP; UnifiedReward via its server)"),
    )
}


def git_sha(repo: str | os.PathLike[str] | None = None) -> str | None:
    """The checkout's commit, 12 hex digits, or None outside a git checkout."""
    where = Path(repo) if repo else Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def image_tag(environ: Mapping[str, str] | None = None) -> str:
    """``$MIXGRPO_IMAGE_TAG``, else the git commit, else ``v<package version>``."""
    from mixgrpo import __version__

    env = os.environ if environ is None else environ
    tag = env.get(TAG_ENV) or git_sha() or f"v{__version__}"
    if not _TAG.match(tag):
        raise ValueError(f"{TAG_ENV}={tag!r} is not a valid image tag: use letters, digits, '_', '.', '-' (at most 128)")
    return tag


def image_ref(key: str, environ: Mapping[str, str] | None = None) -> str:
    """The full reference of image ``key`` ("runtime", "trainer" or "evaluator")."""
    if key not in IMAGES:
        raise KeyError(f"unknown image {key!r}: choose one of {sorted(IMAGES)}")
    env = os.environ if environ is None else environ
    whole = env.get(f"MIXGRPO_IMAGE_{key.upper()}")
    if whole:
        return whole
    registry = (env.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/{IMAGES[key].name}:{image_tag(env)}"


def image_refs(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every image's reference, by key."""
    return {key: image_ref(key, environ) for key in IMAGES}
