"""Variants of the trainer's update phase: window steps batched into one forward, old log-probs in training shapes.

``mixgrpo.train.update_phase`` runs one forward/backward per micro-batch and window step. Here:

- ``update_phase_batched``: the k trained steps of a micro-batch of b rows go through the model as one
  batch of k*b rows (step-major: rows of step t are t*b .. t*b+b-1, each with its own sigma) and one
  backward of ``policy_loss`` over the [b, k] log-probs. ``mean`` over (b, k) equals the step loop's
  sum over steps of ``mean_b / k``, so the gradients are the same (fp32 rounding aside); the stats
  (ratios per step, clip fraction, KL, loss) are the step loop's too.
- ``recompute_old_log_probs``: the old policy's log-probs of the trained steps recomputed with the
  exact shapes of the update (micro-batch rows, step loop or batched), without gradients. Under bf16 the
  rollout (all B rows, shared prefix) and the update (b rows) may run different kernels; the ratio on
  the first micro-batch is then not exactly 1 and, with clip range 1e-4, may be clipped everywhere.
  Recomputing costs one no-grad forward per trained step and makes the first ratio 1 by construction.
- ``first_microbatch_numerics``: the ratio ``exp(logp_new - logp_old)`` and clip fraction the first
  micro-batch of an update would see (weights still those of the rollout).
"""

from __future__ import annotations

import dataclasses

import torch

from mixgrpo import distributed
from mixgrpo.config import TrainConfig
from mixgrpo.distributed import Shard
from mixgrpo.grpo import policy_loss
from mixgrpo.models.base import Conditioning, FlowModel, index_conditioning
from mixgrpo.train import (RolloutBatch, SectionTimer, UpdateStats, autocast_context, micro_batches, rowwise_step,
                           step_rule, trained_steps)


def default_shard(batch: RolloutBatch, cfg: TrainConfig, rank: int) -> Shard:
    """The shard ``update_phase`` assumes when none is given: this rank's groups, all N samples each."""
    groups = len(batch.prompts) // cfg.sampling.group_size
    return Shard(tuple(range(rank * groups, (rank + 1) * groups)), range(cfg.sampling.group_size))


def window_log_probs(policy: FlowModel, batch: RolloutBatch, cond: Conditioning, rows: torch.Tensor,
                     steps_per_row: list[list[int]], cfg: TrainConfig, device: torch.device, *, batched: bool,
                     timer: SectionTimer | None = None, section: str = "forward_train") -> torch.Tensor:
    """[b, k] log-probs of the stored transitions x_i -> x_{i+1} of ``rows``, row r at its k trained steps
    ``steps_per_row[r]`` (the same for every row in a sliding window; drawn per sample for DanceGRPO).

    ``batched``: one velocity call on the k positions' latents concatenated along the batch axis (per-row
    sigma); else one call per position, with the scalar sigma when the rows share the step, exactly as
    ``update_phase``. Gradients flow when enabled by the caller.
    """
    ro, eta, step_fn = batch.rollout, cfg.sampling.eta, step_rule(cfg)
    timer = timer or SectionTimer()
    steps = torch.tensor(steps_per_row)                       # [b, k] step indices
    offsets = steps - ro.window.start
    positions = range(steps.shape[1])
    inputs = [ro.latents[rows, offsets[:, j]].to(device) for j in positions]

    def sigma_of(j: int) -> torch.Tensor:
        column = steps[:, j]
        shared = bool((column == column[0]).all())
        return ro.sigmas[int(column[0])] if shared and not batched else ro.sigmas[column.to(ro.sigmas.device)]

    if batched:
        x = torch.cat(inputs)
        sigma = torch.cat([sigma_of(j) for j in positions])
        stacked = {key: torch.cat([value] * len(positions)) for key, value in cond.items()}
        with timer.section(section), autocast_context(cfg, device):
            velocities = policy.velocity(x, sigma, stacked).float().chunk(len(positions))
    else:
        velocities = []
        for j in positions:
            with timer.section(section), autocast_context(cfg, device):
                velocities.append(policy.velocity(inputs[j], sigma_of(j), cond).float())
    return torch.stack([rowwise_step(step_fn, inputs[j], velocities[j], ro.sigmas, steps[:, j], eta,
                                     ro.latents[rows, offsets[:, j] + 1].to(device))[0] for j in positions], dim=1)


def stored_log_probs(batch: RolloutBatch, rows: torch.Tensor, steps_per_row: list[list[int]]) -> torch.Tensor:
    """[b, k] log-probs the rollout stored for ``rows`` at their trained steps."""
    offsets = torch.tensor(steps_per_row) - batch.rollout.window.start
    return batch.rollout.log_probs[rows[:, None], offsets]


def update_phase_batched(policy: FlowModel, optimizer: torch.optim.Optimizer, batch: RolloutBatch,
                         advantages: torch.Tensor, cfg: TrainConfig, iteration: int, rank: int, device: torch.device,
                         timer: SectionTimer | None = None, shard: Shard | None = None) -> UpdateStats:
    """``update_phase`` with each micro-batch's window steps in one forward/backward (same arguments, same stats)."""
    o = cfg.optim
    timer = timer or SectionTimer()
    ro = batch.rollout
    batches = micro_batches(cfg, shard or default_shard(batch, cfg, rank), iteration)
    stats = UpdateStats()
    clip_sum = kl_sum = loss_sum = 0.0
    for start in range(0, len(batches), o.gradient_accumulation_steps):
        group = batches[start:start + o.gradient_accumulation_steps]
        for index, (rows, generator) in enumerate(group):
            steps = trained_steps(cfg, ro.window, generator, len(rows))
            cond = index_conditioning(batch.cond, rows.to(device))
            adv = advantages[rows].to(device)
            old = stored_log_probs(batch, rows, steps).to(device)
            with distributed.gradient_sync(policy.module, index == len(group) - 1):
                logp = window_log_probs(policy, batch, cond, rows, steps, cfg, device, batched=True, timer=timer)
                out = policy_loss(logp, old, adv, clip_range=o.clip_range, kl_coeff=o.kl_coeff)
                with timer.section("backward"):
                    distributed.backward(policy.module, out.loss / len(group))
            with torch.no_grad():  # the step loop's per-step statistics
                for j in range(len(steps[0])):
                    term = policy_loss(logp[:, j].detach(), old[:, j], adv, clip_range=o.clip_range, kl_coeff=o.kl_coeff)
                    stats.ratios.append(term.ratio_mean)
                    clip_sum += term.clip_fraction
                    kl_sum += term.approx_kl
                    loss_sum += float(term.loss)
            stats.nfe_train += len(steps[0])
        grad_norm = distributed.optimizer_step(policy.module, optimizer, o.max_grad_norm)
        stats.grad_norm = max(stats.grad_norm, grad_norm)
        stats.optimizer_steps += 1
    terms = max(len(stats.ratios), 1)
    stats.loss, stats.clip_fraction, stats.approx_kl = loss_sum / terms, clip_sum / terms, kl_sum / terms
    stats.ratio_mean = sum(stats.ratios) / terms
    stats.ratio_first_microbatch = stats.ratios[0] if stats.ratios else 1.0
    return stats


@torch.no_grad()
def recompute_old_log_probs(policy: FlowModel, batch: RolloutBatch, cfg: TrainConfig, iteration: int, rank: int,
                            device: torch.device, *, batched: bool, timer: SectionTimer | None = None,
                            shard: Shard | None = None) -> RolloutBatch:
    """The batch with the trained steps' old log-probs recomputed in the update's shapes (others kept)."""
    ro = batch.rollout
    log_probs = ro.log_probs.clone()
    for rows, generator in micro_batches(cfg, shard or default_shard(batch, cfg, rank), iteration):
        steps = trained_steps(cfg, ro.window, generator, len(rows))
        cond = index_conditioning(batch.cond, rows.to(device))
        fresh = window_log_probs(policy, batch, cond, rows, steps, cfg, device, batched=batched, timer=timer,
                                 section="forward_recompute")
        columns = (torch.tensor(steps) - ro.window.start).to(log_probs.device)
        log_probs[rows.to(log_probs.device)[:, None], columns] = fresh.to(log_probs.dtype)
    return dataclasses.replace(batch, rollout=dataclasses.replace(ro, log_probs=log_probs))


@torch.no_grad()
def first_microbatch_numerics(policy: FlowModel, batch: RolloutBatch, cfg: TrainConfig, iteration: int, rank: int,
                              device: torch.device, *, batched: bool, shard: Shard | None = None) -> dict[str, float]:
    """ratio = exp(logp_now - logp_stored) over the first micro-batch's trained steps, in the update's shapes.

    Returns the mean ratio, max |ratio - 1|, and the fraction with |ratio - 1| > clip_range.
    """
    ro = batch.rollout
    rows, generator = micro_batches(cfg, shard or default_shard(batch, cfg, rank), iteration)[0]
    steps = trained_steps(cfg, ro.window, generator, len(rows))
    cond = index_conditioning(batch.cond, rows.to(device))
    now = window_log_probs(policy, batch, cond, rows, steps, cfg, device, batched=batched)
    old = stored_log_probs(batch, rows, steps).to(device)
    ratio = torch.exp(now - old)
    return {"ratio_mean": float(ratio.mean()), "ratio_max_abs_deviation": float((ratio - 1).abs().max()),
            "clip_fraction": float(((ratio - 1).abs() > cfg.optim.clip_range).float().mean())}
