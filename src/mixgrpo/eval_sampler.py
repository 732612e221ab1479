"""The one evaluation sampler: held-out images and their per-prompt scores, shared by the trainer's
periodic evaluation (:func:`mixgrpo.train.held_out_rewards`), ``mixgrpo evaluate`` and ``mixgrpo sample``.

An evaluation draws ``per_prompt`` images of every prompt, image ``k`` of a prompt from the initial
noise ``randn(latent_shape, generator=sha256("sample/<seed_k>"))`` with ``seed_k = eval_seeds(per_prompt)[k]``,
then integrates the deterministic ODE (no SDE window). The same seed gives the same noise, so the
trainer's numbers and ``evaluate``'s are the same numbers.
"""

from __future__ import annotations

import torch

from mixgrpo.config import TrainConfig
from mixgrpo.grids import seed_diversity_per_prompt
from mixgrpo.models.base import FlowModel
from mixgrpo.rewards.base import Reward
from mixgrpo.sampling import flow_sigmas, mixed_rollout

DIVERSITY = "heldout_diversity"
"""Name of the never-optimised seed-diversity measure (pixel std across the seeds of a prompt)."""


def eval_seeds(per_prompt: int) -> list[int]:
    """The evaluation seeds ``0 .. per_prompt-1`` (image ``k`` of every prompt uses seed ``k``)."""
    if per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1, got {per_prompt}")
    return list(range(per_prompt))


def eval_rows(prompts: list[str], per_prompt: int) -> tuple[list[str], list[int]]:
    """Prompt-major rows: ``prompts[0]`` x seeds, ``prompts[1]`` x seeds, ..."""
    seeds = eval_seeds(per_prompt)
    return [p for p in prompts for _ in seeds], [s for _ in prompts for s in seeds]


def initial_latents(policy: FlowModel, seeds: list[int]) -> torch.Tensor:
    """[len(seeds), *latent_shape] noise; row ``i`` depends only on ``seeds[i]``."""
    from mixgrpo.seeding import generator_for

    return torch.stack([torch.randn(policy.latent_shape(), generator=generator_for("sample", seed)) for seed in seeds])


@torch.no_grad()
def sample_eval_images(policies: FlowModel | list[FlowModel], prompts: list[str], seeds: list[int], cfg: TrainConfig,
                       device: torch.device, *, switch_step: int | None = None, batch_size: int = 64) -> torch.Tensor:
    """Deterministic ODE samples, one per (prompt, seed) row, in [0, 1] on the CPU.

    ``policies``: one model, or ``[tuned, base]`` with ``switch_step`` for hybrid inference (the first
    model for steps ``< switch_step``, the last after).
    """
    from mixgrpo.train import autocast_context

    policies = policies if isinstance(policies, list) else [policies]
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per row")
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(device)
    switch_sigma = float(sigmas[switch_step]) if switch_step is not None else -1.0
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        conds = [p.encode_prompts(chunk) for p in policies]
        latents = initial_latents(policies[0], seeds[start:start + batch_size]).to(device)

        def velocity_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            which = 0 if float(sigma) > switch_sigma else len(policies) - 1
            with autocast_context(cfg, device):
                return policies[which].velocity(x, sigma, conds[which]).float()

        result = mixed_rollout(velocity_fn, latents, sigmas, range(0, 0), cfg.sampling.eta)
        images.append(policies[-1].decode(result.sample).float().cpu())
    return torch.cat(images)


def score_images(rewards: dict[str, Reward], images: torch.Tensor, rows: list[str]) -> dict[str, torch.Tensor]:
    """Every reward on every image ([rows] each; a failed image is NaN)."""
    from mixgrpo.train import score_phase

    return score_phase(rewards, images, rows)


def per_prompt_scores(image_scores: dict[str, torch.Tensor], images: torch.Tensor, per_prompt: int) -> dict[str, torch.Tensor]:
    """[P] per reward: the nan-mean over a prompt's seeds; plus ``heldout_diversity`` per prompt."""
    out = {name: torch.nanmean(values.float().reshape(-1, per_prompt), dim=1) for name, values in image_scores.items()}
    out[DIVERSITY] = seed_diversity_per_prompt(images, per_prompt)
    return out


def evaluate_policy(policies: FlowModel | list[FlowModel], rewards: dict[str, Reward], prompts: list[str],
                    per_prompt: int, cfg: TrainConfig, device: torch.device, *, switch_step: int | None = None):
    """Sample every prompt x ``per_prompt`` seeds, score them: ``(images, image_scores, per_prompt_scores)``."""
    rows, seeds = eval_rows(prompts, per_prompt)
    images = sample_eval_images(policies, rows, seeds, cfg, device, switch_step=switch_step)
    image_scores = score_images(rewards, images, rows)
    return images, image_scores, per_prompt_scores(image_scores, images, per_prompt)
