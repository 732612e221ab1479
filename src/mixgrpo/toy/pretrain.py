"""Flow-matching pre-training of the toy base model, and a cache that does it once.

Each step draws prompts uniformly from the whole world, renders them at random positions and
sizes, and trains the x0 prediction: ``x_t = (1 - sigma) x0 + sigma eps`` with
``sigma = shift*s / (1 + (shift-1)*s)``, ``s ~ U(0, 1)`` (the sampler's own schedule density),
loss ``mean((x0_pred - x0)^2)``. The transformer and the text encoder train together.

The default run (24000 steps, ~55 min on one core) leaves a base model that draws the asked colours
and clean but imperfect shapes (slightly lumpy circles, squares that are a little oblong, a missing object now and
then), so that alignment has work to do. Runs are deterministic for a seed (one CPU thread, deterministic kernels).

The wheel ships that default base model (``mixgrpo/toy/base``, 2.4 MB, made by
``mixgrpo toy pretrain --force`` with the default config and seed 0), and the 12000-step one the learning bench
was measured from (``mixgrpo/toy/base_12000``): ``ensure_base_model`` copies a shipped model into the cache when
the requested config's key is its key, instead of pre-training. Any other config (or ``force``) pre-trains.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from mixgrpo.toy.model import FORMAT, ToyFlowModel, ToyModelConfig, save_toy_model
from mixgrpo.toy.world import all_prompts, parse_prompt, render_batch

PRETRAIN_VERSION = 2  # bump when the data or the loss change, so cached base models are rebuilt
CACHE_ENV = "MIXGRPO_CACHE"
SHIPPED_BASE = Path(__file__).parent / "base"  # the default base model, as ``pretrain_base_model`` wrote it
SHIPPED_BASES = (SHIPPED_BASE, Path(__file__).parent / "base_12000")
"""Every base model the wheel ships: the default, and the 12000-step one the learning bench was measured from."""


@dataclass(frozen=True)
class PretrainConfig:
    """Pre-training settings; every field enters the cache key of ``ensure_base_model``."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    steps: int = 24000  # optimiser steps (1500 left blobs; 4000 lumpy shapes, held-out toy_shape 0.18; 12000: 0.52; 24000: 0.68)
    batch_size: int = 32  # images per step
    learning_rate: float = 2e-3  # AdamW peak, after linear warm-up, cosine decay to 10 %
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm
    sigma_shift: float = 3.0  # same shift as the sampler's schedule

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")


@dataclass(frozen=True)
class PretrainResult:
    """What a pre-training run produced: the saved model directory and its loss per step."""

    directory: Path
    losses: list[float]
    wall_time_s: float


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels on one CPU thread, restored afterwards.

    One thread: the toy model is too small to gain from more (measured on 2 cores), results no
    longer depend on the machine's core count, and a busy machine does not stall the run.
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


def _learning_rate(config: PretrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch(model: ToyFlowModel, config: PretrainConfig, prompts: list[str], generator: torch.Generator):
    """One training batch: prompts, clean latents x0, noised latents x_t and their sigmas."""
    picks = torch.randint(len(prompts), (config.batch_size,), generator=generator).tolist()
    batch_prompts = [prompts[i] for i in picks]
    x0 = model.encode_images(render_batch([parse_prompt(p) for p in batch_prompts], generator))
    s = torch.rand(config.batch_size, generator=generator)
    sigma = config.sigma_shift * s / (1 + (config.sigma_shift - 1) * s)
    noise = torch.randn(x0.shape, generator=generator)
    x_t = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    return batch_prompts, x0, x_t, sigma


def train_base_model(config: PretrainConfig, seed: int = 0, progress: bool = True,
                     stop_after: int | None = None) -> tuple[ToyFlowModel, list[float]]:
    """Pre-train a fresh toy model in memory; returns it (in eval mode) and the loss per step.

    ``stop_after``: run only the first N steps of ``config``'s schedule (to check a long run's start).
    """
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(seed)
        model = ToyFlowModel(config.model)
        generator = torch.Generator().manual_seed(seed)
        parameters = [*model.module.parameters(), *model.text_encoder.parameters()]
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        prompts = all_prompts()
        losses: list[float] = []
        model.module.train()
        bar = tqdm(range(min(config.steps, stop_after or config.steps)), desc="pretrain toy model", disable=not progress)
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = _learning_rate(config, step)
            batch_prompts, x0, x_t, sigma = _batch(model, config, prompts, generator)
            loss = torch.nn.functional.mse_loss(model.predict_x0(x_t, sigma, model.condition(batch_prompts)), x0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.4f}")
        model.module.eval()
        return model, losses


def pretrain_base_model(
    config: PretrainConfig, out_dir: str | Path, seed: int = 0, progress: bool = True
) -> PretrainResult:
    """Pre-train and save with ``save_toy_model`` plus ``pretrain.json`` (config, seed, losses, time)."""
    start = time.perf_counter()
    model, losses = train_base_model(config, seed=seed, progress=progress)
    wall_time = time.perf_counter() - start
    directory = save_toy_model(model, out_dir)
    record = {"config": asdict(config), "seed": seed, "key": config_key(config, seed), "wall_time_s": wall_time,
              "losses": losses}
    (directory / "pretrain.json").write_text(json.dumps(record))
    return PretrainResult(directory=directory, losses=losses, wall_time_s=wall_time)


def default_cache_dir() -> Path:
    """``$MIXGRPO_CACHE`` if set, else ``~/.cache/mixgrpo``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mixgrpo")


def config_key(config: PretrainConfig, seed: int) -> str:
    """A short hash of everything that determines the base model."""
    payload = {"config": asdict(config), "seed": seed, "format": FORMAT, "version": PRETRAIN_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _recorded_key(directory: Path) -> str | None:
    record = directory / "pretrain.json"
    return json.loads(record.read_text()).get("key") if record.is_file() else None


def shipped_base_key() -> str | None:
    """The config key of the default base model shipped in the package (``None`` if none is shipped)."""
    return _recorded_key(SHIPPED_BASE)


def shipped_base_label() -> str:
    """How reports and model versions name the default base model (``model.path`` ""): its steps and config key."""
    return f"built-in toy base model ({PretrainConfig().steps} pre-training steps, key {shipped_base_key()})"


def base_model_label(model_path: str) -> str:
    """The base model's name in provenance: ``model.path`` itself, or ``shipped_base_label()`` when it is ""."""
    return model_path or shipped_base_label()


def shipped_base_for(config: PretrainConfig, seed: int = 0) -> Path | None:
    """The shipped base model (``SHIPPED_BASES``) that ``config`` and ``seed`` make, if the wheel has one."""
    key = config_key(config, seed)
    return next((directory for directory in SHIPPED_BASES if _recorded_key(directory) == key), None)


def ensure_base_model(
    cache_dir: str | Path | None = None,
    config: PretrainConfig | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """The cached base model's directory, pre-training it first if it is missing (or if ``force``).

    A missing model that the wheel ships (``shipped_base_for``) is copied from the package instead.
    The model is written to a temporary directory beside the target and renamed into place,
    so a crash never leaves a half-written model; when two processes race, the first rename wins.
    """
    config = config or PretrainConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"toy-base-{config_key(config, seed)}"
    if (target / "toy_model.json").is_file() and not force:
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        shipped = None if force else shipped_base_for(config, seed)
        if shipped is not None:
            shutil.copytree(shipped, staging, dirs_exist_ok=True)
        else:
            pretrain_base_model(config, staging, seed=seed, progress=progress)
        if force and target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=root))
            os.rename(target, retired / "model")
            shutil.rmtree(retired)
        os.rename(staging, target)
    except OSError:
        if not (target / "toy_model.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
