"""Group-relative advantages and the clipped GRPO policy loss (spec section 5).

Advantages: each prompt's N samples form a group; rewards are normalised inside the group,
``A = (r - mean_group) / (std_group + 1e-8)`` with the unbiased std, and clamped to ``+-clip``.
With several reward models the default mix ("advantage") normalises each reward and takes the
weighted sum of the advantages (weights normalised to sum to 1; code vs paper: the paper writes an
unweighted sum); "reward" normalises the weighted sum of the raw rewards instead.

A reward model that failed for a sample reports a non-finite value (NaN). Unlike the reference
code, where such a value enters the statistics, ``on_failure="mask"`` leaves it out of its group's
statistics (and reports it), while ``on_failure="raise"`` stops with an error.

Loss per sample and window step: ``ratio = exp(logp_new - logp_old)``,
``loss = mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps))) + kl_coeff*mean(0.5*(logp_new-logp_old)^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Mix = Literal["advantage", "reward"]
OnFailure = Literal["mask", "raise"]
MIXES: tuple[str, ...] = get_args(Mix)
ON_FAILURES: tuple[str, ...] = get_args(OnFailure)

STD_EPS = 1e-8


@dataclass(frozen=True)
class GroupStats:
    """Masked statistics of one quantity per group.

    Attributes:
        mean: ``[G]`` mean of the valid values of each group (float32 in ``AdvantageStats``).
        std: ``[G]`` unbiased std of the valid values (NaN where fewer than 2 are valid).
        count: ``[G]`` number of valid values in each group.
    """

    mean: Tensor
    std: Tensor
    count: Tensor


@dataclass(frozen=True)
class AdvantageStats:
    """What ``group_advantages_with_stats`` saw, for logging and for failing loudly.

    Attributes:
        groups: ``[G]`` the distinct group ids, sorted; row ``g`` of every ``GroupStats`` is group ``groups[g]``.
        rewards: per reward name, its masked group statistics.
        mixed: in "reward" mix, the statistics of the weighted reward sum; ``None`` in "advantage" mix.
        num_failed: per reward name, how many samples had a non-finite (failed) value.
        valid: ``[B]`` bool, False where the sample had no usable reward and got advantage 0.
        num_clipped: how many advantages were clamped to ``+-clip``.
    """

    groups: Tensor
    rewards: dict[str, GroupStats]
    mixed: GroupStats | None
    num_failed: dict[str, int]
    valid: Tensor
    num_clipped: int

    @property
    def num_invalid(self) -> int:
        """Samples whose advantage was set to 0 because no reward could be used."""
        return int((~self.valid).sum())


@dataclass(frozen=True)
class PolicyLossOutput:
    """Result of ``policy_loss``; every field but ``loss`` is a detached float for logging.

    Attributes:
        loss: scalar with grad, ``policy_loss + kl_coeff * approx_kl``.
        policy_loss: the clipped surrogate term ``mean(max(-A*ratio, -A*clip(ratio)))``.
        approx_kl: ``mean(0.5*(logp_new - logp_old)^2)``.
        ratio_mean: ``mean(exp(logp_new - logp_old))``.
        clip_fraction: fraction of elements with ``|ratio - 1| > clip_range``.
    """

    loss: Tensor
    policy_loss: float
    approx_kl: float
    ratio_mean: float
    clip_fraction: float


def _float32(stats: GroupStats) -> GroupStats:
    return GroupStats(mean=stats.mean.float(), std=stats.std.float(), count=stats.count)


def masked_group_stats(values: Tensor, valid: Tensor, index: Tensor, num_groups: int) -> GroupStats:
    """Per-group ``mean`` and unbiased ``std = sqrt(sum (r - mean)^2 / (n - 1))`` over ``valid`` values.

    ``index[b]`` is the group (0..G-1) of sample ``b``; invalid values take no part.
    """
    weight = valid.to(values.dtype)
    zeros = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, index, weight)
    total = zeros.index_add(0, index, torch.where(valid, values, 0.0))
    mean = total / count.clamp_min(1.0)
    deviation = torch.where(valid, values - mean[index], 0.0)
    variance = zeros.index_add(0, index, deviation.square()) / (count - 1.0).clamp_min(1.0)
    std = torch.where(count >= 2, variance.sqrt(), torch.nan)
    return GroupStats(mean=mean, std=std, count=count.long())


def normalise_in_groups(
    values: Tensor, valid: Tensor, index: Tensor, num_groups: int
) -> tuple[Tensor, Tensor, GroupStats]:
    """``(r - mean_group) / (std_group + 1e-8)`` over valid values.

    Returns the normalised values (0 where unusable), where they are usable (the value is valid
    and its group has at least 2 valid values), and the group statistics.
    """
    stats = masked_group_stats(values, valid, index, num_groups)
    usable = valid & (stats.count[index] >= 2)
    normalised = (values - stats.mean[index]) / (stats.std[index] + STD_EPS)
    return torch.where(usable, normalised, 0.0), usable, stats


def _normalised_weights(names: list[str], weights: dict[str, float] | None) -> dict[str, float]:
    if weights is None:
        return {name: 1.0 / len(names) for name in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"weights for unknown rewards {unknown}; known: {', '.join(names)}")
    missing = [name for name in names if name not in weights]
    if missing:
        raise ValueError(f"no weight for rewards {missing}; give every reward a weight (0 leaves one out)")
    bad = {name: w for name, w in weights.items() if not (float(w) >= 0.0 and float(w) < float("inf"))}
    if bad:
        raise ValueError(f"reward weights must be finite and >= 0, got {bad}")
    total = sum(float(w) for w in weights.values())
    if total == 0.0:
        raise ValueError("all reward weights are 0; give at least one reward a positive weight")
    return {name: float(weights[name]) / total for name in names}


def _check_inputs(rewards: dict[str, Tensor], group_ids: Tensor, mix: str, on_failure: str, clip: float) -> int:
    if not rewards:
        raise ValueError("rewards is empty; pass at least one reward name -> Tensor[B]")
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; choose one of {', '.join(MIXES)}")
    if on_failure not in ON_FAILURES:
        raise ValueError(f"unknown on_failure {on_failure!r}; choose one of {', '.join(ON_FAILURES)}")
    if not clip > 0:
        raise ValueError(f"clip={clip} must be > 0 (advantages are clamped to +-clip; 5.0 in MixGRPO)")
    if group_ids.ndim != 1 or group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(
            f"group_ids must be a 1-D integer tensor, got shape {tuple(group_ids.shape)} {group_ids.dtype}"
        )
    batch = group_ids.shape[0]
    if batch == 0:
        raise ValueError("empty batch: group_ids and rewards have no samples")
    for name, values in rewards.items():
        if values.shape != (batch,):
            raise ValueError(
                f"reward {name!r} has shape {tuple(values.shape)} but group_ids has {batch} samples; "
                "every reward must be a 1-D tensor with one value per sample"
            )
    return batch


def group_advantages_with_stats(
    rewards: dict[str, Tensor],
    group_ids: Tensor,
    weights: dict[str, float] | None = None,
    mix: Mix = "advantage",
    clip: float = 5.0,
    on_failure: OnFailure = "mask",
) -> tuple[Tensor, AdvantageStats]:
    """Group-normalised, weighted, clamped advantages ``[B]`` (float32) and their statistics.

    Args:
        rewards: reward name -> ``[B]`` scores; a non-finite value marks a failed score.
        group_ids: ``[B]`` integer id of each sample's group (its prompt); any ids, in any order.
        weights: reward name -> weight >= 0, normalised to sum to 1; ``None`` = equal weights.
        mix: "advantage": ``A = sum_k w_k (r_k - mean_k)/(std_k + 1e-8)``;
            "reward": ``R = sum_k w_k r_k``, ``A = (R - mean)/(std + 1e-8)``.
        clip: advantages are clamped to ``[-clip, clip]``.
        on_failure: "mask": a failed value is left out of its group's statistics; in "advantage"
            mix the sample's advantage is the weighted mean over the rewards it has (weights
            renormalised); a sample with nothing usable (in "reward" mix: any failed reward) gets
            0 and ``valid=False``. "raise": any failed value raises ``ValueError``.
    """
    batch = _check_inputs(rewards, group_ids, mix, on_failure, clip)
    names = list(rewards)
    normalised_weights = _normalised_weights(names, weights)
    device = next(iter(rewards.values())).device
    groups, index, sizes = torch.unique(group_ids.to(device), return_inverse=True, return_counts=True)
    if bool((sizes < 2).any()):
        lonely = groups[sizes < 2].tolist()
        raise ValueError(
            f"group of one (group ids {lonely}): GRPO needs >= 2 samples per prompt; set group_size >= 2"
        )
    num_groups = groups.shape[0]
    values = {name: rewards[name].detach().to(torch.float64) for name in names}
    finite = {name: torch.isfinite(v) for name, v in values.items()}
    num_failed = {name: int((~ok).sum()) for name, ok in finite.items()}
    if on_failure == "raise":
        for name in names:
            if num_failed[name]:
                raise ValueError(
                    f"reward {name!r} failed (non-finite) for {num_failed[name]} of {batch} samples; "
                    "fix the reward model or set on_failure='mask' to leave those values out"
                )

    per_reward: dict[str, GroupStats] = {}
    mixed = None
    if mix == "advantage":
        weighted = torch.zeros(batch, dtype=torch.float64, device=device)
        weight_sum = torch.zeros(batch, dtype=torch.float64, device=device)
        for name in names:
            advantage, usable, per_reward[name] = normalise_in_groups(values[name], finite[name], index, num_groups)
            weighted += normalised_weights[name] * advantage
            weight_sum += normalised_weights[name] * usable.to(torch.float64)
        valid = weight_sum > 0
        advantages = torch.where(valid, weighted / weight_sum.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    else:
        per_reward = {name: masked_group_stats(values[name], finite[name], index, num_groups) for name in names}
        all_finite = torch.stack([finite[name] for name in names]).all(dim=0)
        total = sum(normalised_weights[name] * torch.where(all_finite, values[name], 0.0) for name in names)
        advantages, valid, mixed = normalise_in_groups(total, all_finite, index, num_groups)

    num_clipped = int((advantages.abs() > clip).sum())
    advantages = advantages.clamp(-clip, clip).to(torch.float32)
    stats = AdvantageStats(
        groups=groups,
        rewards={name: _float32(group_stats) for name, group_stats in per_reward.items()},
        mixed=None if mixed is None else _float32(mixed),
        num_failed=num_failed,
        valid=valid,
        num_clipped=num_clipped,
    )
    return advantages, stats


def group_advantages(
    rewards: dict[str, Tensor],
    group_ids: Tensor,
    weights: dict[str, float] | None = None,
    mix: Mix = "advantage",
    clip: float = 5.0,
    on_failure: OnFailure = "mask",
) -> Tensor:
    """Advantages ``[B]`` only; see ``group_advantages_with_stats`` for the formulas and options."""
    advantages, _ = group_advantages_with_stats(rewards, group_ids, weights, mix, clip, on_failure)
    return advantages


def policy_loss(
    log_probs_new: Tensor,
    log_probs_old: Tensor,
    advantages: Tensor,
    clip_range: float = 1e-4,
    kl_coeff: float = 0.0,
) -> PolicyLossOutput:
    """Clipped GRPO surrogate over samples (and window steps).

    ``ratio = exp(logp_new - logp_old)``;
    ``loss = mean(max(-A*ratio, -A*clip(ratio, 1-eps, 1+eps))) + kl_coeff*mean(0.5*(logp_new-logp_old)^2)``.

    Args:
        log_probs_new: ``[B]`` or ``[B, S]`` (S window steps) log-probs under the current policy (with grad).
        log_probs_old: same shape, from the rollout (treated as constants).
        advantages: ``[B]``, broadcast over the window steps.
        clip_range: ``eps`` > 0 (1e-4 in MixGRPO).
        kl_coeff: weight >= 0 of the KL-to-old term (0 in MixGRPO).
    """
    if not clip_range > 0:
        raise ValueError(f"clip_range={clip_range} must be > 0 (the PPO trust region; 1e-4 in MixGRPO)")
    if not kl_coeff >= 0:
        raise ValueError(f"kl_coeff={kl_coeff} must be >= 0 (0 disables the KL-to-old term)")
    if log_probs_new.shape != log_probs_old.shape:
        raise ValueError(
            f"log_probs_new {tuple(log_probs_new.shape)} and log_probs_old {tuple(log_probs_old.shape)} "
            "must have the same shape"
        )
    if log_probs_new.ndim not in (1, 2) or log_probs_new.numel() == 0:
        raise ValueError(f"log probs must be non-empty [B] or [B, S], got shape {tuple(log_probs_new.shape)}")
    if advantages.shape != log_probs_new.shape[:1]:
        raise ValueError(
            f"advantages {tuple(advantages.shape)} must be [B] = [{log_probs_new.shape[0]}], one per sample"
        )
    log_ratio = log_probs_new - log_probs_old.detach()
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype).reshape(-1, *([1] * (ratio.ndim - 1)))
    surrogate = torch.maximum(-adv * ratio, -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range))
    policy_term = surrogate.mean()
    approx_kl = 0.5 * log_ratio.square().mean()
    loss = policy_term + kl_coeff * approx_kl
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean()
    return PolicyLossOutput(
        loss=loss,
        policy_loss=float(policy_term.detach()),
        approx_kl=float(approx_kl.detach()),
        ratio_mean=float(ratio.detach().mean()),
        clip_fraction=float(clip_fraction),
    )


def reference_kl(mean: Tensor, mean_ref: Tensor, std: Tensor) -> Tensor:
    """KL between the policy's and a frozen reference policy's Gaussian step, per sample (Flow-GRPO's beta term).

    Both steps share the std ``s`` and differ in the mean, so
    ``KL(N(mu, s^2) || N(mu_ref, s^2)) = (mu - mu_ref)^2 / (2 s^2)``, averaged over the non-batch elements
    (the same normalisation as the log-probs). ``mean_ref`` is treated as a constant.
    """
    if mean.shape != mean_ref.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and mean_ref {tuple(mean_ref.shape)} must have the same shape")
    if not bool(torch.all(std > 0)):
        raise ValueError("std must be > 0 (an SDE step's noise level)")
    kl = (mean.float() - mean_ref.detach().float()).square() / (2.0 * std.float() ** 2)
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def reference_anchor(x0: Tensor, x0_ref: Tensor) -> Tensor:
    """How far the policy's clean-image prediction ``x0`` is from the frozen reference's, per sample:
    ``mean((x0 - x0_ref)^2)`` over the non-batch elements (``x0_ref`` a constant).

    The anchor for states the window does not train: their ODE steps have no noise, so no KL, but their
    prediction is what ``reference_kl`` compares through the mean (``mu = x + dt * v`` with ``v = (x - x0) / sigma``).
    """
    if x0.shape != x0_ref.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and x0_ref {tuple(x0_ref.shape)} must have the same shape")
    squared = (x0.float() - x0_ref.detach().float()).square()
    return squared.mean(dim=tuple(range(1, squared.ndim)))
