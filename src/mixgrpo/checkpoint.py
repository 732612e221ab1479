"""Checkpoints of a training run: ``OUTPUT_DIR/checkpoints/checkpoint-{iteration:06d}/``.

A checkpoint holds the weights (``model.safetensors``), the optimiser state and the RNG state
(``optimizer.pt``, ``rng.pt``: tensors and plain containers, loaded with ``weights_only=True``; with
``optim.ema_decay`` the average in ``ema.safetensors``),
the resolved ``config.yaml`` and ``trainer_state.json``. It is sealed with the object store's
``MANIFEST.json`` (:func:`mixgrpo.storage.seal_local_dir`: sizes, sha256, ``metadata.iteration``),
written last and then renamed into place, so a directory with a manifest is complete, a local
checkpoint and its published copy carry the same manifest, and a corrupt file is named on load.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixgrpo.config import TrainConfig, config_to_yaml
from mixgrpo.storage import MANIFEST_NAME


CHECKPOINT_PREFIX = "checkpoint-"
EMA_FILE = "ema.safetensors"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints (with their manifest), oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / MANIFEST_NAME).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _seal(tmp: Path, final: Path, iteration: int) -> None:
    """Write the manifest (sha256 of every file, the iteration) last, then rename ``tmp`` to ``final``."""
    from mixgrpo.storage import seal_local_dir

    seal_local_dir(tmp, {"iteration": iteration})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def save_checkpoint(output_dir: Path, iteration: int, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                    cfg: TrainConfig, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/checkpoint-{iteration}`` atomically (rank 0): files, manifest last, then rename.

    ``iteration`` is the number of completed iterations (the next one to run); the states are
    full (consolidated) state dicts keyed by parameter name; ``ema_state`` (``optim.ema_decay``) goes to
    ``ema.safetensors``. With ``checkpoint_uri`` the directory
    is then published there (manifest last, so a half upload is never picked up).
    """
    root = output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{iteration:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, tmp / "model.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    if ema_state is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema_state.items()}, tmp / EMA_FILE)
    torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
    (tmp / "config.yaml").write_text(config_to_yaml(cfg))
    (tmp / "trainer_state.json").write_text(json.dumps({"iteration": iteration}))
    _seal(tmp, final, iteration)
    if cfg.checkpoint_uri:
        from mixgrpo.storage import prune_published, publish_dir, read_manifest

        uri = f"{cfg.checkpoint_uri.rstrip('/')}/{final.name}"
        publish_dir(final, uri, metadata={"iteration": iteration})
        read_manifest(uri)  # the new checkpoint is visible in the store before older ones go
        prune_published(cfg.checkpoint_uri.rstrip("/"), cfg.keep_checkpoints, CHECKPOINT_PREFIX)
    for old in checkpoint_dirs(output_dir)[:-cfg.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path, checkpoint_uri: str = "") -> Path | None:
    """The newest complete local checkpoint; else the newest complete one under ``checkpoint_uri``, fetched."""
    if checkpoint_dirs(output_dir):
        return checkpoint_dirs(output_dir)[-1]
    if not checkpoint_uri:
        return None
    from mixgrpo.storage import fetch_dir, latest_complete

    uri = latest_complete(checkpoint_uri.rstrip("/"), CHECKPOINT_PREFIX)
    if uri is None:
        return None
    final = output_dir / "checkpoints" / uri.rstrip("/").rsplit("/", 1)[-1]
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    manifest = fetch_dir(uri, tmp)  # verified against the store's manifest, which it leaves in tmp
    if "iteration" in manifest.metadata:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    else:  # published without its iteration: seal it again with the trainer state's
        _seal(tmp, final, json.loads((tmp / "trainer_state.json").read_text())["iteration"])
    print(f"fetched checkpoint {uri} to {final}")
    return final


class CheckpointError(RuntimeError):
    """A checkpoint is corrupt or holds something other than tensors; the message names the file."""


def load_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Check the manifest, restore the RNG; return (next iteration, model state, optimiser state)."""
    from mixgrpo.storage import StorageError, verify_local_dir

    try:
        manifest = verify_local_dir(path)
        iteration = int(manifest.metadata["iteration"])
    except (StorageError, KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: {error}; the checkpoint is corrupt (or from an older mixgrpo), "
                              "delete it to resume from the previous one") from None
    torch.set_rng_state(load_tensor_file(path / "rng.pt")["torch"])
    return iteration, load_file(path / "model.safetensors"), load_tensor_file(path / "optimizer.pt")


def load_ema_state(path: Path) -> dict[str, torch.Tensor] | None:
    """The checkpoint's EMA average (``optim.ema_decay``), or None when it was written without one. Verified
    with the rest of the checkpoint by ``load_checkpoint``."""
    return load_file(path / EMA_FILE) if (path / EMA_FILE).is_file() else None


def load_tensor_file(file: Path) -> dict:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never code from a pickle."""
    import pickle

    try:
        return torch.load(file, weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"checkpoint file {file} holds objects other than tensors and plain containers "
                           f"({first_line}); refusing to load it, since unpickling it could run code. Delete this "
                           "checkpoint (and its copy under checkpoint_uri) and resume from an earlier one") from None


def save_final_weights(directory: Path, module: torch.nn.Module, model_state: dict[str, torch.Tensor]) -> None:
    """diffusers layout: ``config.json`` + ``diffusion_pytorch_model.safetensors`` of the full state."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    module.save_config(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, directory / "diffusion_pytorch_model.safetensors")


def no_checkpoint(output_dir: Path, checkpoint_uri: str, required: bool, main: bool) -> None:
    """``--resume`` found nothing: an error with ``--require-checkpoint``, else a clear notice."""
    where = f"{output_dir / 'checkpoints'}" + (f" or under {checkpoint_uri}" if checkpoint_uri else "")
    if required:
        raise FileNotFoundError(f"--require-checkpoint: no complete checkpoint in {where}; check output_dir / "
                                "checkpoint_uri, or drop --require-checkpoint to start from scratch")
    if main:
        print(f"--resume: no complete checkpoint in {where}; starting from scratch at iteration 0")
