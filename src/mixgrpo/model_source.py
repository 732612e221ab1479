"""Where a model comes from: a local directory, ``file://``, ``s3://`` or the MLflow registry
(``models:/NAME@ALIAS``, ``models:/NAME/VERSION``), resolved to a local directory and loaded as a policy.

What the directory may hold (checked in this order):
  toy_model.json                  a complete toy model (the toy base, or a tuned result: the trainer
                                  copies the base's text encoder into ``final/``)
  mixgrpo_model.json              tuned weights (``transformer/`` or FLUX LoRA weights) and the URI of
                                  their base model (see :mod:`mixgrpo.model_card`)
  model_index.json                a diffusers FLUX directory (a base model)
  transformer/config.json         tuned weights of the toy base without ``mixgrpo_model.json`` (older runs)
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch

REGISTRY_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))")


class ModelSourceError(ValueError):
    """A model source that cannot be resolved or loaded; the message names the source and the fix."""


def cache_dir() -> Path:
    from mixgrpo.toy.pretrain import default_cache_dir

    return default_cache_dir() / "models"


def registry_source(uri: str, tracking_uri: str | None = None) -> str:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> the version's source (its weights URI)."""
    match = REGISTRY_URI.fullmatch(uri)
    if not match:
        raise ModelSourceError(f"--model {uri}: write models:/NAME@ALIAS or models:/NAME/VERSION")
    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        raise ModelSourceError(f"--model {uri} is a registry URI: give --mlflow URI or set MLFLOW_TRACKING_URI "
                               "(make run's store: sqlite:///$PWD/runs/local/mlflow.db)")
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    name = match["name"]
    try:
        version = (client.get_model_version_by_alias(name, match["alias"]) if match["alias"]
                   else client.get_model_version(name, match["version"]))
    except MlflowException as exc:
        raise ModelSourceError(f"--model {uri}: not found in the registry at {tracking} ({exc.message.splitlines()[0]}); "
                               f"list versions with: mlflow models / MlflowClient('{tracking}').search_model_versions(\"name='{name}'\")") from None
    return version.source


def resolve_model_source(source: str, tracking_uri: str | None = None) -> Path:
    """A local directory holding the model of ``source`` (``s3://`` prefixes are fetched into the cache, verified)."""
    if source.startswith("models:/"):
        return resolve_model_source(registry_source(source, tracking_uri), tracking_uri)
    scheme = urlparse(source).scheme
    if scheme == "file":
        local = Path(unquote(urlparse(source).path))
    elif scheme == "s3":
        from mixgrpo.storage import StorageError, fetch_dir

        local = cache_dir() / hashlib.sha256(source.rstrip("/").encode()).hexdigest()[:16]
        try:
            fetch_dir(source, local)
        except StorageError as exc:
            raise ModelSourceError(f"--model {source}: could not fetch it ({exc})") from None
        return local
    elif scheme and len(scheme) > 1:
        raise ModelSourceError(f"--model {source}: unsupported scheme {scheme}://; use a directory, file://, s3:// or models:/")
    else:
        local = Path(source)
    if not local.is_dir():
        raise ModelSourceError(f"--model {source}: {local} is not a directory")
    return local


def load_policy(directory: Path, cfg, device: torch.device, source: str = ""):  # noqa: ANN001, ANN201
    """The policy in ``directory`` (see the module docstring), built on ``cfg`` (kind and path are set here)."""
    from mixgrpo.evaluate import load_tuned_policy
    from mixgrpo.model_card import read_model_info
    from mixgrpo.policies import build_policy

    what = f"--model {source or directory}" + (f" (at {directory})" if source and str(directory) != source else "")
    info = read_model_info(directory)
    if (directory / "toy_model.json").is_file():
        cfg.model.kind, cfg.model.path = "toy", str(directory)
        policy = build_policy(cfg, device)
    elif info is not None:
        cfg.model.kind, cfg.model.path = info["model_kind"], info["base_model"]
        if info["model_kind"] == "flux":
            for key in ("lora_rank", "lora_alpha", "lora_target_modules", "height", "width", "guidance",
                        "max_sequence_length", "transformer_dtype"):
                setattr(cfg.model, key, info["config"]["model"][key])
            cfg.model.lora_rank = 0  # the LoRA weights are loaded as saved, not created fresh
        policy = load_tuned_policy(cfg, directory, device)
    elif (directory / "model_index.json").is_file():
        cfg.model.kind, cfg.model.path = "flux", str(directory)
        policy = build_policy(cfg, device)
    elif (directory / "transformer" / "config.json").is_file():
        cfg.model.kind, cfg.model.path = "toy", ""
        policy = load_tuned_policy(cfg, directory, device)
    else:
        raise ModelSourceError(f"{what} holds no model: expected toy_model.json, mixgrpo_model.json, model_index.json "
                               "or transformer/config.json (the trainer writes OUTPUT_DIR/final)")
    policy.module.eval()
    return policy
