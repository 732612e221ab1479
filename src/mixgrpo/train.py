"""The MixGRPO training loop: rollout -> score -> advantages -> update, one iteration a page.

Every random choice of iteration ``m`` (prompts, initial noise, SDE noise, the order of the
micro-batches, the DanceGRPO step subsets) is drawn from generators seeded by
``(seed, m, global group id)``, and the sliding window is a pure function of ``m``. A checkpoint
therefore only needs the weights, the optimiser state and ``m``: a run resumed from iteration ``k``
ends with the same weights as an uninterrupted run, bit for bit. Because the seeds name global
groups, not ranks, W processes with P prompts each draw the same samples as one process with W*P
prompts (see ``mixgrpo.distributed`` for the global batch).

Launch: ``mixgrpo train --config toy [section.key=value ...]``; several processes:
``mixgrpo launch --engine fsdp -- train --config ...`` (torchrun; rank 0 logs and writes checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file, save_file

from mixgrpo import distributed
from mixgrpo.checkpoint import (CHECKPOINT_PREFIX, checkpoint_dirs, latest_checkpoint, load_checkpoint, load_ema_state,
                                no_checkpoint, save_checkpoint, save_final_weights)
from mixgrpo.config import TrainConfig, config_to_yaml
from mixgrpo.distributed import Shard, World
from mixgrpo.ema import WeightEMA, maybe_applied
from mixgrpo.grpo import policy_loss, reference_anchor, reference_kl
from mixgrpo.models.base import Conditioning, FlowModel, index_conditioning, repeat_conditioning
from mixgrpo.policies import build_policy, build_reference, build_rewards
from mixgrpo.rewards.base import Reward
from mixgrpo.seeding import generator_for
from mixgrpo.selection import BestTracker
from mixgrpo.solvers import data_prediction
from mixgrpo.sampling import Rollout, dance_sde_step, flow_sigmas, mixed_rollout, sde_step
from mixgrpo.tracking import MetricsLog, truncate_metrics
from mixgrpo.window import SlidingWindow


# --------------------------------------------------------------------------- small helpers


class SectionTimer:
    """Accumulates wall seconds per named section (model forward / backward, for the overhead figure)."""

    def __init__(self, device: torch.device | None = None):
        self.seconds: dict[str, float] = {}
        self.sync = device is not None and device.type == "cuda"

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ("auto" or "bf16"); float32 elsewhere."""
    use_bf16 = cfg.model.mixed_precision == "bf16" or (cfg.model.mixed_precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_window(cfg: TrainConfig) -> SlidingWindow | None:
    """The sliding window of the config; None for strategy "all" (every step is SDE)."""
    w = cfg.window
    if w.strategy == "all":
        return None
    return SlidingWindow(
        num_steps=cfg.sampling.num_steps, size=w.size, shift_interval=w.shift_interval, stride=w.stride,
        strategy=w.strategy, roll_back=w.roll_back, seed=cfg.seed,
        interval_max=w.interval_max, interval_min=w.interval_min, min_left=w.min_left, max_left=w.max_left,
    )


def sde_window(cfg: TrainConfig, window: SlidingWindow | None, iteration: int) -> range:
    """Steps sampled with the SDE at ``iteration``: the sliding window, or all T steps."""
    return range(0, cfg.sampling.num_steps) if window is None else window.steps(iteration)


def trained_steps(cfg: TrainConfig, rollout_window: range, generator: torch.Generator, num_rows: int) -> list[list[int]]:
    """Steps whose log-probs are optimised, one sorted list per row of a micro-batch.

    Sliding window: all its steps, for every row. Strategy "all": a random ``train_fraction`` of the
    first T-1 transitions (DanceGRPO: int(24*0.6) = 14), drawn per sample as DanceGRPO does.
    """
    if cfg.window.strategy != "all":
        return [list(rollout_window)] * num_rows
    candidates = cfg.sampling.num_steps - 1
    count = max(1, int(candidates * cfg.window.train_fraction))
    return [sorted(torch.randperm(candidates, generator=generator)[:count].tolist()) for _ in range(num_rows)]


def post_window_states(sample: torch.Tensor, sigmas: torch.Tensor, window: range, generator: torch.Generator,
                       last_steps: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """States for ``optim.anchor_coeff``, one per row: ``x = (1 - s) * x0 + s * eps`` with ``x0`` the row's final
    sample (the image the rewards scored) and ``s`` uniform over the steps after the window
    (``sigmas[window.stop:-1]``, all > 0), only the last ``last_steps`` of the schedule when > 0.
    Returns (x [b, ...] float32, s [b]) on the CPU, or None when every step is in the window (all-SDE modes)."""
    num_steps = len(sigmas) - 1
    first = max(window.stop, num_steps - last_steps) if last_steps > 0 else window.stop
    after = sigmas[first:-1].float().cpu()
    if len(after) == 0:
        return None
    index = torch.randint(len(after), (len(sample),), generator=generator)
    s = after[index]
    eps = torch.randn(sample.shape, generator=generator, dtype=torch.float32)
    s_rows = s.view(-1, *[1] * (sample.ndim - 1))
    return (1 - s_rows) * sample.float().cpu() + s_rows * eps, s


def rowwise_step(step_fn: Callable, x: torch.Tensor, v: torch.Tensor, sigmas: torch.Tensor, steps: torch.Tensor,
                 eta: float, x_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The step rule for rows that sit at different steps ``steps`` ([b]): (log_prob [b], mean, std [b]).

    The rules take one step index, so rows are grouped by step (one group for a sliding window)."""
    unique = torch.unique(steps).tolist()
    if len(unique) == 1:
        out = step_fn(x, v, sigmas, unique[0], eta, prev_sample=x_next)
        return out.log_prob, out.mean, out.std.expand(len(x))
    log_prob = torch.empty(len(x), device=x.device)
    mean = torch.empty(x.shape, device=x.device)
    std = torch.empty(len(x), device=x.device)
    for i in unique:
        mask = (steps == i).to(x.device)
        out = step_fn(x[mask], v[mask], sigmas, i, eta, prev_sample=x_next[mask])
        log_prob[mask], mean[mask], std[mask] = out.log_prob, out.mean, out.std
    return log_prob, mean, std


def step_rule(cfg: TrainConfig) -> Callable:
    return sde_step if cfg.sampling.sde_type == "flow" else dance_sde_step


# --------------------------------------------------------------------------- the four phases


@dataclass
class RolloutBatch:
    prompts: list[str]            # B = G*N, group-major
    group_ids: torch.Tensor       # [B]
    cond: Conditioning            # B rows
    rollout: Rollout
    images: torch.Tensor          # [B, 3, H, W] in [0, 1]


def prompt_for_group(prompts: list[str], seed: int, iteration: int, group: int) -> str:
    """The training prompt of global group ``group`` at ``iteration`` (with replacement)."""
    generator = generator_for(seed, iteration, group, "prompt")
    return prompts[int(torch.randint(len(prompts), (1,), generator=generator))]


def choose_prompts(prompts: list[str], count: int, seed: int, iteration: int, rank: int = 0) -> list[str]:
    """``count`` training prompts for this iteration and rank: those of global groups ``rank*count ...``."""
    return [prompt_for_group(prompts, seed, iteration, g) for g in range(rank * count, (rank + 1) * count)]


def initial_noise(policy: FlowModel, group: int, members: range, cfg: TrainConfig, iteration: int) -> torch.Tensor:
    """[len(members), ...] starting latents of one global group; one noise per group when ``init_same_noise``."""
    shape = policy.latent_shape()
    generator = generator_for(cfg.seed, iteration, group, "noise")
    if cfg.sampling.init_same_noise:
        return torch.randn(shape, generator=generator).expand(len(members), *shape).clone()
    return torch.randn((cfg.sampling.group_size, *shape), generator=generator)[members.start:members.stop]


@torch.no_grad()
def rollout_phase(policy: FlowModel, prompts: list[str], cfg: TrainConfig, window: range, iteration: int,
                  rank: int, device: torch.device, sigmas: torch.Tensor, timer: SectionTimer | None = None,
                  shard: Shard | None = None) -> RolloutBatch:
    """Sample the shard's images (N per prompt by default) with the mixed ODE/SDE sampler of the old policy.

    All groups of the process in one batched ``mixed_rollout``; each group's initial and SDE noise comes
    from its own generator, so a sample does not depend on which other groups share the process.
    ``shard`` defaults to global groups ``rank*len(prompts) ...`` with all N samples each.
    """
    s = cfg.sampling
    timer = timer or SectionTimer()
    shard = shard or Shard(tuple(range(rank * len(prompts), (rank + 1) * len(prompts))), range(s.group_size))
    n = len(shard.members)
    cond = repeat_conditioning(policy.encode_prompts(prompts), n)

    def velocity_fn(x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        rows_cond = cond if rows is None else index_conditioning(cond, rows.to(device))
        with timer.section("forward"), autocast_context(cfg, device):
            return policy.velocity(x, sigma, rows_cond).float()

    latents = torch.cat([initial_noise(policy, group, shard.members, cfg, iteration) for group in shard.groups])
    rollout = mixed_rollout(
        velocity_fn, latents.to(device), sigmas, window, s.eta,
        sde_type=s.sde_type, post_solver=s.post_solver, solver_order=s.solver_order, solver_type=s.solver_type,
        post_ratio=s.post_ratio, shift=s.shift, group_size=n if s.shared_prefix else None,
        generator=[generator_for(cfg.seed, iteration, group, shard.members.start, "sde") for group in shard.groups],
    )
    images = policy.decode(rollout.pred_x0 if s.decode_pred_x0 else rollout.sample)
    group_ids = torch.tensor(shard.groups).repeat_interleave(n)
    return RolloutBatch([p for p in prompts for _ in range(n)], group_ids, cond, rollout, images)


@torch.no_grad()
def score_phase(rewards: dict[str, Reward], images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Every reward on every image; a failed sample is NaN (masked by the advantage step)."""
    return {name: reward(images, prompts).float().cpu() for name, reward in rewards.items()}


@dataclass
class UpdateStats:
    loss: float = 0.0
    ratio_mean: float = 0.0
    ratio_first_microbatch: float = 1.0
    clip_fraction: float = 0.0
    approx_kl: float = 0.0
    kl_ref: float = 0.0
    anchor: float = 0.0
    grad_norm: float = 0.0
    optimizer_steps: int = 0
    nfe_train: int = 0
    ratios: list[float] = field(default_factory=list)


def micro_batches(cfg: TrainConfig, shard: Shard, iteration: int) -> list[tuple[torch.Tensor, torch.Generator]]:
    """Local row indices of each micro-batch, in order, with the generator of its DanceGRPO step subset.

    Each group's samples are shuffled by the group's own generator and cut into ``train_batch_size``
    chunks (several whole groups per chunk when train_batch_size is a multiple of the group's local
    size); the list takes slot 0 of every group, then slot 1, ... With W ranks of one group each
    and ``gradient_accumulation_steps`` a, the optimiser steps see the same samples as one process
    with all W groups and W*a accumulation steps.
    """
    n, size = len(shard.members), cfg.optim.train_batch_size
    if cfg.optim.mix_prompts:
        return _mixed_micro_batches(cfg, shard, iteration)
    units: list[list[tuple[torch.Tensor, int]]] = []  # per unit of groups: its chunks (rows, first group)
    per_unit = size // n if size >= n and size % n == 0 else 1
    for k in range(0, len(shard.groups), per_unit):
        rows = torch.cat([torch.randperm(n, generator=generator_for(cfg.seed, iteration, g, shard.members.start, "update")) + (k + j) * n
                          for j, g in enumerate(shard.groups[k:k + per_unit])])
        units.append([(chunk, shard.groups[k]) for chunk in rows.split(size)])
    out = []
    for slot in range(max(len(u) for u in units)):
        for unit in units:
            if slot < len(unit):
                rows, group = unit[slot]
                out.append((rows, generator_for(cfg.seed, iteration, group, shard.members.start, slot, "steps")))
    return out


def _mixed_micro_batches(cfg: TrainConfig, shard: Shard, iteration: int) -> list[tuple[torch.Tensor, torch.Generator]]:
    """``optim.mix_prompts``: micro-batch j holds chunk j (``train_batch_size / G`` rows) of every one of the G
    groups, as G ranks with one prompt each and that chunk size would train it together; each group's rows
    are shuffled by the same generator as in ``micro_batches``."""
    n, groups = len(shard.members), len(shard.groups)
    per_group = cfg.optim.train_batch_size // groups
    shuffled = [torch.randperm(n, generator=generator_for(cfg.seed, iteration, g, shard.members.start, "update")) + k * n
                for k, g in enumerate(shard.groups)]
    return [(torch.cat([rows[start:start + per_group] for rows in shuffled]),
             generator_for(cfg.seed, iteration, shard.groups[0], shard.members.start, slot, "steps"))
            for slot, start in enumerate(range(0, n, per_group))]


def update_phase(policy: FlowModel, optimizer: torch.optim.Optimizer, batch: RolloutBatch, advantages: torch.Tensor,
                 cfg: TrainConfig, iteration: int, rank: int, device: torch.device,
                 timer: SectionTimer | None = None, shard: Shard | None = None,
                 reference: FlowModel | None = None) -> UpdateStats:
    """Clipped-ratio policy gradient on the window's log-probs, micro-batch by micro-batch.

    Loss per micro-batch and step: ``mean(max(-A*r, -A*clip(r, 1-eps, 1+eps)))`` over the rows that train
    the step, weighted by their share of the micro-batch and divided by (steps per row x accumulation), so
    an optimiser step averages over samples, their steps and micro-batches; DDP / FSDP then average the
    gradients over the ranks, which equals one process accumulating all ranks' micro-batches. With
    ``reference`` (a frozen base policy) and ``optim.kl_ref_coeff`` = beta, each term adds
    ``beta * (mu - mu_ref)^2 / (2 s^2)`` (``grpo.reference_kl``). With ``optim.anchor_coeff`` = c, each micro-batch
    adds ``c * reference_anchor`` at one state after the window per row (``post_window_states``).
    """
    o, s = cfg.optim, cfg.sampling
    timer = timer or SectionTimer()
    ro = batch.rollout
    window = ro.window
    step_fn = step_rule(cfg)
    groups = len(batch.prompts) // s.group_size
    shard = shard or Shard(tuple(range(rank * groups, (rank + 1) * groups)), range(s.group_size))
    batches = micro_batches(cfg, shard, iteration)
    stats = UpdateStats()
    clip_sum = kl_sum = loss_sum = kl_ref_sum = anchor_sum = 0.0
    terms = anchor_terms = 0
    anchored = reference is not None and o.anchor_coeff > 0
    # The evaluation's (and MixGRPO's) schedule, not Flash's compressed one after the window: the anchor holds the
    # last steps the tuned model is sampled with.
    anchor_sigmas = flow_sigmas(s.num_steps, s.shift) if anchored else None
    for start in range(0, len(batches), o.gradient_accumulation_steps):
        group = batches[start:start + o.gradient_accumulation_steps]
        steps_per_mb = [trained_steps(cfg, window, generator, len(rows)) for rows, generator in group]
        for index, ((mb_rows, generator), steps_per_row) in enumerate(zip(group, steps_per_mb)):
            steps = torch.tensor(steps_per_row)          # [rows, k]: row r trains steps[r, 0..k-1]
            steps_per_sample = steps.shape[1]
            stats.nfe_train += steps_per_sample  # forward+backward passes per sample (the paper's "NFE train")
            rows = mb_rows
            cond = index_conditioning(batch.cond, rows.to(device))
            adv = advantages[rows].to(device)
            anchor_states = (post_window_states((ro.pred_x0 if s.decode_pred_x0 else ro.sample)[rows], anchor_sigmas,
                                                window, generator, o.anchor_steps) if anchored else None)
            # One forward per position j for every rank and micro-batch (FSDP / DDP need the same number of
            # collectives everywhere); rows at different steps (DanceGRPO) get one sigma each.
            for position in range(steps_per_sample):
                column = steps[:, position]
                offsets = column - window.start
                x = ro.latents[rows, offsets].to(device)
                x_next = ro.latents[rows, offsets + 1].to(device)
                sigma = ro.sigmas[int(column[0])] if bool((column == column[0]).all()) else ro.sigmas[column.to(ro.sigmas.device)]
                last = index == len(group) - 1 and position == steps_per_sample - 1
                with distributed.gradient_sync(policy.module, last):  # all-reduce once per optimiser step
                    with timer.section("forward_train"), autocast_context(cfg, device):
                        v = policy.velocity(x, sigma, cond).float()
                    log_prob, mean, std = rowwise_step(step_fn, x, v, ro.sigmas, column, s.eta, x_next)
                    out = policy_loss(log_prob, ro.log_probs[rows, offsets].to(device), adv, clip_range=o.clip_range, kl_coeff=o.kl_coeff)
                    loss = out.loss
                    if reference is not None and o.kl_ref_coeff > 0:
                        with torch.no_grad(), timer.section("forward_reference"), autocast_context(cfg, device):
                            v_ref = reference.velocity(x, sigma, cond).float()
                        _, mean_ref, _ = rowwise_step(step_fn, x, v_ref, ro.sigmas, column, s.eta, x_next)
                        kl_ref = reference_kl(mean, mean_ref, std.view(-1, *[1] * (x.ndim - 1)))
                        loss = loss + o.kl_ref_coeff * kl_ref.mean()
                        kl_ref_sum += float(kl_ref.mean().detach())
                    loss = loss / (steps_per_sample * len(group))
                    if anchor_states is not None and position == steps_per_sample - 1:
                        anchor = anchor_term(policy, reference, anchor_states, cond, cfg, device, timer)
                        loss = loss + o.anchor_coeff * anchor.mean() / len(group)
                        anchor_sum += float(anchor.mean().detach())
                        anchor_terms += 1
                    with timer.section("backward"):
                        distributed.backward(policy.module, loss)
                stats.ratios.append(out.ratio_mean)
                clip_sum += out.clip_fraction
                kl_sum += out.approx_kl
                loss_sum += float(out.loss.detach())
                terms += 1
        grad_norm = distributed.optimizer_step(policy.module, optimizer, o.max_grad_norm)
        stats.grad_norm = max(stats.grad_norm, grad_norm)
        stats.optimizer_steps += 1
    stats.loss = loss_sum / max(terms, 1)
    stats.clip_fraction = clip_sum / max(terms, 1)
    stats.approx_kl = kl_sum / max(terms, 1)
    stats.kl_ref = kl_ref_sum / max(terms, 1)
    stats.anchor = anchor_sum / max(anchor_terms, 1)
    stats.ratio_mean = sum(stats.ratios) / max(len(stats.ratios), 1)
    stats.ratio_first_microbatch = stats.ratios[0] if stats.ratios else 1.0
    return stats


def anchor_term(policy: FlowModel, reference: FlowModel, states: tuple[torch.Tensor, torch.Tensor], cond: Conditioning,
                cfg: TrainConfig, device: torch.device, timer: SectionTimer) -> torch.Tensor:
    """``reference_anchor`` at ``post_window_states``: the policy's x0 prediction (with gradient) against the frozen
    reference's, per row."""
    x, sigma = states[0].to(device), states[1].to(device)
    with timer.section("forward_anchor"), autocast_context(cfg, device):
        v = policy.velocity(x, sigma, cond).float()
    with torch.no_grad(), timer.section("forward_reference"), autocast_context(cfg, device):
        v_ref = reference.velocity(x, sigma, cond).float()
    sigma_rows = sigma.view(-1, *[1] * (x.ndim - 1))
    return reference_anchor(data_prediction(x, v, sigma_rows), data_prediction(x, v_ref, sigma_rows))


# --------------------------------------------------------------------------- evaluation on held-out prompts


def held_out_rewards(policy: FlowModel, rewards: dict[str, Reward], prompts: list[str], cfg: TrainConfig,
                     world: World) -> dict[str, float]:
    """Mean over every held-out prompt of every reward (optimised and held-out), each prompt x
    ``cfg.eval_images_per_prompt`` seeds through the shared evaluation sampler, plus the never-optimised
    ``heldout_diversity`` (pixel std across the seeds of a prompt; collapse -> 0).

    Under several processes each rank samples an equal share of the prompts (``distributed.rank_slice``), rank 0
    scores every image, and every rank returns rank 0's numbers: the same numbers as one process, W times sooner.
    """
    from mixgrpo.eval_sampler import eval_rows, per_prompt_scores, sample_eval_images, score_images

    per_prompt = cfg.eval_images_per_prompt
    rows, seeds = eval_rows(distributed.rank_slice(prompts, world), per_prompt)
    images = distributed.gather_rows_to_main(world, sample_eval_images(policy, rows, seeds, cfg, world.device))
    means = None
    if world.is_main:
        images = images[:len(prompts) * per_prompt]  # without the padding of the last share
        scores = per_prompt_scores(score_images(rewards, images, eval_rows(prompts, per_prompt)[0]), images, per_prompt)
        means = {name: float(torch.nanmean(values)) for name, values in scores.items()}
    return distributed.broadcast_object(world, means)


# --------------------------------------------------------------------------- prompts


def load_prompts(path: str, split: str) -> list[str]:
    """Prompts from a file read and validated as prepare-prompts reads it (txt / csv / jsonl / parquet,
    see ``mixgrpo.data.read_training_prompts``), or the toy world's ``split`` ("train" / "validation" / "test")."""
    if path:
        from mixgrpo.data import read_training_prompts

        return read_training_prompts(path)
    from mixgrpo.toy.world import train_validation_test_split

    train, validation, test = train_validation_test_split()
    return list({"train": train, "validation": validation, "test": test}[split])


# --------------------------------------------------------------------------- faults: reward outage


class RewardOutageError(RuntimeError):
    """An optimised reward failed (NaN) for too many samples: the run would train on nothing."""


@dataclass
class RewardFailureGuard:
    """Stops the run when an optimised reward fails for every sample of one iteration, or for more than
    ``max_fraction`` of its samples over the last ``window`` iterations (``sum(failed) / sum(samples)``)."""

    max_fraction: float
    window: int
    history: list[tuple[dict[str, int], int]] = field(default_factory=list)

    def check(self, iteration: int, failed: dict[str, int], samples: int) -> None:
        self.history = (self.history + [(dict(failed), samples)])[-self.window:]
        for name, count in failed.items():
            if samples and count >= samples:
                raise RewardOutageError(
                    f"reward {name!r} failed for all {samples} samples of iteration {iteration} (NaN: the reward "
                    "server or model is down or answers nonsense; see the warnings above). Fix it, then rerun with --resume")
            total = sum(n for _, n in self.history)
            fraction = sum(f.get(name, 0) for f, _ in self.history) / max(total, 1)
            if len(self.history) == self.window and fraction > self.max_fraction:
                raise RewardOutageError(
                    f"reward {name!r} failed for {fraction:.0%} of the samples of iterations {iteration - self.window + 1}-"
                    f"{iteration} (more than rewards.max_failed_fraction={self.max_fraction}). Fix the reward, "
                    "then rerun with --resume (or raise rewards.max_failed_fraction)")


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    output_dir: Path
    iterations: int
    final_weights: Path
    held_out_before: dict[str, float]
    held_out_after: dict[str, float]
    seconds: float


def iterations_bar(start: int, stop: int, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(range(start, stop))
    from tqdm.auto import tqdm

    return iter(tqdm(range(start, stop), initial=start, total=stop, desc="mixgrpo", unit="it", dynamic_ncols=True))


def train(cfg: TrainConfig, *, resume: bool = False, device: str | None = None,
          require_checkpoint: bool = False) -> TrainResult:
    """Run MixGRPO (or a baseline mode) for ``cfg.max_iterations`` iterations, in this process's share.

    Under torchrun every rank runs this function: it rolls out its shard of the global batch,
    rewards are gathered so each group is normalised over all its samples, gradients are averaged
    by the engine, and rank 0 logs, writes checkpoints and the final weights. ``resume`` with no
    checkpoint says so and starts from scratch; ``require_checkpoint`` makes that an error instead.
    """
    t_start = time.perf_counter()
    with distributed.joined(cfg, device) as world:
        return _train(cfg, world, resume or require_checkpoint, t_start, require_checkpoint)


def check_validation_is_held_out(validation: list[str], train: list[str], source: str) -> None:
    """Checkpoint selection must score prompts the trainer never trains on: raise if any validation prompt is
    also a training prompt (selection would then prefer weights that fit the training prompts)."""
    shared = sorted(set(validation) & set(train))
    if shared:
        raise ValueError(f"{len(shared)} of the {len(set(validation))} validation prompts ({source}) are also training "
                         f"prompts, e.g. {shared[0]!r}: select_best must score prompts the trainer never trains on; "
                         "remove them from the training prompts or pass other validation_prompts")


def _train(cfg: TrainConfig, world: World, resume: bool, t_start: float, require_checkpoint: bool = False) -> TrainResult:
    dev, main = world.device, world.is_main
    torch.manual_seed(cfg.seed)
    train_prompts = load_prompts(cfg.prompts, "train")  # a bad prompt file fails before any model loads
    eval_prompts = load_prompts(cfg.eval_prompts, "test")
    validation_prompts = load_prompts(cfg.validation_prompts, "validation") if cfg.select_best else []
    check_validation_is_held_out(validation_prompts, train_prompts, cfg.validation_prompts or "the toy validation split")
    output_dir = Path(cfg.output_dir)
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config_to_yaml(cfg))

    policy = build_policy(cfg, dev)
    raw_module = policy.module
    reference = build_reference(policy) if cfg.optim.kl_ref_coeff > 0 or cfg.optim.anchor_coeff > 0 else None
    policy.module, optimizer = distributed.prepare(raw_module, world, cfg, lambda params: torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay))
    # from here on the adapter's forward (``self.module(...)``) goes through the engine
    ema = WeightEMA(raw_module, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    scorer = main or cfg.distributed.reward_ranks == "all"      # "rank0": reward models live on rank 0 only
    rewards = build_rewards(cfg, cfg.rewards.names, dev) if scorer else {}
    held_out_names = [n for n in cfg.rewards.held_out if n not in cfg.rewards.names]
    all_rewards = {**rewards, **build_rewards(cfg, held_out_names, dev)} if scorer else {}
    reward_names = list(cfg.rewards.names) + held_out_names
    tracker = BestTracker(list(cfg.rewards.names), held_out_names, cfg.selection_min_diversity,
                          cfg.selection_tolerance, cfg.early_stop_patience)
    window = build_window(cfg)
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift).to(dev)
    shard = distributed.shard_for(cfg, world)

    start_iteration = 0
    checkpoint = latest_checkpoint(output_dir, cfg.checkpoint_uri) if resume and main else None
    found = distributed.broadcast_object(world, checkpoint is not None)
    if resume and not found:
        no_checkpoint(output_dir, cfg.checkpoint_uri, require_checkpoint, main)
    if found:
        start_iteration, model_state, optimizer_state = load_checkpoint(checkpoint) if main else (0, {}, {})
        distributed.load_full_states(world, policy.module, optimizer, model_state, optimizer_state)
        start_iteration = distributed.broadcast_object(world, start_iteration)
        if ema is not None:
            resume_ema(ema, raw_module, checkpoint, world)
        if main:
            print(f"resumed from {checkpoint} at iteration {start_iteration}")
            truncate_metrics(output_dir / "metrics.jsonl", start_iteration)
    elif not resume and main:
        (output_dir / "metrics.jsonl").unlink(missing_ok=True)
    bar = cfg.progress_bar and main and sys.stderr.isatty()  # tqdm on a terminal; progress lines elsewhere
    log = MetricsLog(output_dir / "metrics.jsonl", cfg, start_iteration, progress=not bar) if main else None

    with maybe_applied(ema, raw_module):
        held_out_before = held_out_rewards(policy, all_rewards, eval_prompts, cfg, world)
    best_dir = output_dir / "best"
    if cfg.select_best and start_iteration > 0 and (best_dir / "best.json").is_file():
        tracker = BestTracker.from_state(json.loads((best_dir / "best.json").read_text()))
    elif cfg.select_best:
        with maybe_applied(ema, raw_module):
            select_if_best(tracker, 0, policy, all_rewards, validation_prompts, cfg, world, best_dir)
    if start_iteration == 0 and log:
        log.log({"iteration": 0, "held_out": held_out_before,
                 **({"validation": tracker.history[-1]} if cfg.select_best and tracker.history else {})})

    failure_guard = RewardFailureGuard(cfg.rewards.max_failed_fraction, cfg.rewards.failure_window)
    for iteration in iterations_bar(start_iteration, cfg.max_iterations, bar):
        timer = SectionTimer(dev)
        t0, cpu0 = time.perf_counter(), time.process_time()
        steps = sde_window(cfg, window, iteration)
        prompts = [prompt_for_group(train_prompts, cfg.seed, iteration, g) for g in shard.groups]
        batch = rollout_phase(policy, prompts, cfg, steps, iteration, world.rank, dev, sigmas, timer, shard)
        t1 = time.perf_counter()
        if cfg.distributed.reward_ranks == "rank0" and world.distributed:
            scores = distributed.score_on_rank0(world, all_rewards, reward_names, batch.images, batch.prompts)
        else:
            scores = score_phase(all_rewards, batch.images, batch.prompts)
        advantages, adv_stats, scores = distributed.gather_group_advantages(
            world, scores, batch.group_ids, optimised=cfg.rewards.names, weights=cfg.rewards.weights or None,
            mix=cfg.rewards.mix, clip=cfg.rewards.advantage_clip, on_failure=cfg.rewards.on_failure)
        failure_guard.check(iteration + 1, adv_stats.num_failed, len(batch.prompts) * world.world_size)
        t2 = time.perf_counter()
        update = update_phase(policy, optimizer, batch, advantages, cfg, iteration, world.rank, dev, timer, shard, reference)
        if ema is not None:
            ema.update(raw_module)
        t3, cpu3 = time.perf_counter(), time.process_time()

        all_group_ids = distributed.all_gather_rows(world, batch.group_ids)  # the scores are the whole global batch's
        record = {
            "iteration": iteration + 1,
            "window_start": steps.start, "window_stop": steps.stop,
            "nfe_old": batch.rollout.nfe, "row_evals_old": batch.rollout.row_evals, "nfe_train": update.nfe_train,
            "samples": len(batch.prompts) * world.world_size, "processes": world.world_size,
            "rewards": {name: {"mean": float(torch.nanmean(v)), "std": float(torch.nan_to_num(v).std()),
                               "group_std": mean_group_std(v, all_group_ids)} for name, v in scores.items()},
            "advantage": {"mean": float(advantages.mean()), "std": float(advantages.std()), "abs_max": float(advantages.abs().max()),
                          "failed": adv_stats.num_failed, "invalid": adv_stats.num_invalid, "clipped": adv_stats.num_clipped},
            "loss": update.loss, "ratio_mean": update.ratio_mean, "ratio_first_microbatch": update.ratio_first_microbatch,
            "clip_fraction": update.clip_fraction, "approx_kl": update.approx_kl, "kl_ref": update.kl_ref, "anchor": update.anchor, "grad_norm": update.grad_norm,
            "optimizer_steps": update.optimizer_steps,
            "seconds": {"rollout": t1 - t0, "reward": t2 - t1, "train": t3 - t2, "total": t3 - t0, "cpu_total": cpu3 - cpu0,
                        **{f"model_{name}": value for name, value in timer.seconds.items()}},
        }
        done, stop = iteration + 1, False
        evaluate_held_out = cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_iterations
        select = cfg.select_best and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_iterations)
        if evaluate_held_out or select:
            with maybe_applied(ema, raw_module):  # every evaluation (and the selected weights) sees the average
                if evaluate_held_out:
                    record["held_out"] = held_out_rewards(policy, all_rewards, eval_prompts, cfg, world)
                if select:
                    select_if_best(tracker, done, policy, all_rewards, validation_prompts, cfg, world, best_dir)
                    if main:  # the tracker lives on rank 0; every rank stops when it says so
                        record["validation"] = tracker.history[-1]
                    stop = bool(distributed.broadcast_object(world, tracker.should_stop))
        if log:
            log.log(record)
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
            checkpoint_all_ranks(world, output_dir, done, policy.module, optimizer, cfg, ema)
        if stop:
            if main:
                print(f"early stop after iteration {done}: {tracker.since_best} validation evaluations without a new best "
                      f"(best: iteration {tracker.best_iteration}, combined {tracker.best_score:.4f})")
            cfg.max_iterations = done
            break

    final_iteration = max(cfg.max_iterations, start_iteration)
    last = checkpoint_dirs(output_dir)[-1].name if main and checkpoint_dirs(output_dir) else ""
    if distributed.broadcast_object(world, last != f"{CHECKPOINT_PREFIX}{final_iteration:06d}"):
        checkpoint_all_ranks(world, output_dir, final_iteration, policy.module, optimizer, cfg, ema)
    if ema is not None:
        ema.copy_to(raw_module)  # the final weights are the average (the best evaluation's below, if earlier)
    best_iteration = distributed.broadcast_object(world, tracker.best_iteration) if cfg.select_best else final_iteration
    if best_iteration != final_iteration:
        restore_best(world, policy.module, best_dir)
        if main:
            from mixgrpo.console import say

            rejected = [h for h in tracker.history if h["combined"] > tracker.best_score and not h["qualifies"]]
            why = f"; {len(rejected)} later evaluations scored higher but failed a guard, e.g. {rejected[-1]['failed'][0]}" if rejected else ""
            say(f"final weights = iteration {tracker.best_iteration} (best validation evaluation, combined "
                f"{tracker.best_score:.3f}), not the last ({final_iteration}){why}")
    held_out_after = held_out_rewards(policy, all_rewards, eval_prompts, cfg, world)
    final_dir = output_dir / "final"
    model_state, _ = distributed.full_states(policy.module, optimizer) if world.distributed else ({}, {})
    if main:
        log.log({"iteration": final_iteration, "held_out": held_out_after, "final": True,
                 **({"selected_iteration": tracker.best_iteration} if cfg.select_best else {})})
        log.close()
        if world.distributed:
            save_final_weights(final_dir / "transformer", raw_module, model_state)
        else:
            shutil.rmtree(final_dir, ignore_errors=True)
            policy.module = raw_module
            if hasattr(policy, "save_pretrained"):  # FLUX: transformer/ or, with LoRA, the LoRA weights
                policy.save_pretrained(final_dir)
            else:
                raw_module.save_pretrained(final_dir / "transformer", safe_serialization=True)
        from mixgrpo.model_card import write_model_files

        write_model_files(final_dir, cfg, held_out_before, held_out_after)  # mixgrpo_model.json, README.md
        if cfg.checkpoint_uri:
            from mixgrpo.storage import publish_dir

            publish_dir(final_dir, f"{cfg.checkpoint_uri.rstrip('/')}/final", metadata={"iteration": final_iteration})
    distributed.barrier(world)
    return TrainResult(output_dir, final_iteration, final_dir, held_out_before, held_out_after, time.perf_counter() - t_start)


def mean_group_std(values: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Mean over groups of the (unbiased) std of a reward inside its group: the spread GRPO's advantages
    normalise; near 0 a group carries no signal and its normalised advantages are mostly noise."""
    stds = [torch.nan_to_num(values[group_ids == g]).std() for g in torch.unique(group_ids)]
    return float(torch.stack(stds).mean())


def select_if_best(tracker: BestTracker, iteration: int, policy: FlowModel, rewards: dict[str, Reward],
                   prompts: list[str], cfg: TrainConfig, world: World, best_dir: Path) -> None:
    """Evaluate on the validation prompts; when it is the best qualifying evaluation, save its weights to
    ``best_dir`` (rank 0; collective under several processes). The tracker's state is saved beside them."""
    evaluation = held_out_rewards(policy, rewards, prompts, cfg, world)
    is_best = distributed.broadcast_object(world, tracker.update(iteration, evaluation) if world.is_main else False)
    if is_best:
        model_state = distributed.full_model_state(policy.module) if world.distributed else {
            k: v.detach() for k, v in policy.module.state_dict().items()}
        if world.is_main:
            best_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous().cpu() for k, v in model_state.items()}, best_dir / ".model.tmp")
            (best_dir / ".model.tmp").replace(best_dir / "model.safetensors")
    if world.is_main:
        best_dir.mkdir(parents=True, exist_ok=True)
        (best_dir / "best.json").write_text(json.dumps(tracker.state(), indent=1))
    distributed.barrier(world)


def restore_best(world: World, module: torch.nn.Module, best_dir: Path) -> None:
    """Load the best evaluation's weights (saved by ``select_if_best``) into the module on every rank."""
    state = load_file(best_dir / "model.safetensors") if world.is_main else {}
    if world.distributed:
        distributed.load_full_model_state(world, module, state)
    else:
        module.load_state_dict(state)


def checkpoint_all_ranks(world: World, output_dir: Path, iteration: int, module: torch.nn.Module,
                         optimizer: torch.optim.Optimizer, cfg: TrainConfig, ema: WeightEMA | None = None) -> None:
    """Consolidate the states (collective), rank 0 writes the checkpoint (with the EMA's average), the others wait."""
    model_state, optimizer_state = distributed.full_states(module, optimizer)
    if world.is_main:
        save_checkpoint(output_dir, iteration, model_state, optimizer_state, cfg,
                        ema.state_dict() if ema is not None else None)
    distributed.barrier(world)


def resume_ema(ema: WeightEMA, module: torch.nn.Module, checkpoint: Path | None, world: World) -> None:
    """The checkpoint's average (rank 0 reads it, every rank gets it); a checkpoint without one (written with
    ``optim.ema_decay`` 0) starts the average at the resumed weights, with a warning."""
    state = load_ema_state(checkpoint) if world.is_main and checkpoint is not None else None
    state = distributed.broadcast_object(world, state)
    if state is None:
        if world.is_main:
            print(f"warning: checkpoint {checkpoint} holds no EMA average; it starts at the resumed weights")
        ema.restart(module)
    else:
        ema.load_state_dict(state)
