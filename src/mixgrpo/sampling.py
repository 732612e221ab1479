"""Sampling for MixGRPO: the flow schedule, the ODE/SDE step rules and the mixed ODE-SDE rollout.

Notation (spec §3): ``x`` is the latent at ``sigma = sigmas[i]``, ``v`` the predicted velocity,
``dt = sigmas[i+1] - sigmas[i] < 0``; x0 prediction ``x - sigma*v``. Every step rule is a pure function
of tensors; the rollout and the trainer's log-prob recomputation call the same functions. Math is in
float32; ``sample`` comes back in the input dtype, ``mean``, ``std`` and ``log_prob`` stay float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
from torch import Tensor

from mixgrpo.solvers import SOLVER_ORDERS, SOLVER_TYPES, SolverType, data_prediction, dpm_solver_step

SdeType = Literal["flow", "dance"]
PostSolver = Literal["euler", "dpmsolver++"]
SDE_TYPES: tuple[str, ...] = ("flow", "dance")
POST_SOLVERS: tuple[str, ...] = ("euler", "dpmsolver++")

VelocityFn = Callable[..., Tensor]
"""``velocity_fn(x, sigma) -> v``; with a shared prefix also ``velocity_fn(x, sigma, rows=idx)``."""

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------
# Schedule


def _shift_time(s: Tensor, shift: float) -> Tensor:
    """sigma = shift*s / (1 + (shift - 1)*s) (SD3 time shift), in float64."""
    s = s.double()
    return shift * s / (1.0 + (shift - 1.0) * s)


def flow_sigmas(num_steps: int, shift: float) -> Tensor:
    """sigma_i = shift*s_i / (1 + (shift-1)*s_i), s = linspace(1, 0, T+1): [T+1] float32, 1.0 -> 0.0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0 (3.0 for FLUX), got {shift}")
    return _shift_time(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift).float()


def _check_window(window: range, num_steps: int) -> None:
    if not isinstance(window, range) or window.step != 1:
        raise ValueError(f"window must be a range with step 1 (e.g. range(l, l + 4)), got {window!r}")
    if not 0 <= window.start <= window.stop <= num_steps:
        raise ValueError(
            f"window {window!r} lies beyond the {num_steps}-step schedule; use 0 <= start <= stop <= {num_steps}"
        )


def flash_sigmas(sigmas_or_num_steps: Tensor | int, shift: float, window: range, ratio: float) -> Tensor:
    """MixGRPO-Flash schedule (spec §6): the schedule up to the window's end, then a compressed tail.

    last = window.stop - 1 (also for an empty window); n = max(int((T - last)*ratio), 2) points
    linspace(s[last+1], 0, n) in the unshifted time s = linspace(1, 0, T+1), then shifted. The first of
    them is ``sigmas[last+1]`` itself, so the window's steps are those of the uncompressed schedule.
    Deviation: spec and reference write n = int(max((T - last)*ratio, 1)), whose n = 1 stops at
    sigma[last+1] and leaves the final latent noisy; n >= 2 always ends at 0. A window that reaches the
    last step leaves ``sigmas`` unchanged.
    """
    if isinstance(sigmas_or_num_steps, int):
        sigmas = flow_sigmas(sigmas_or_num_steps, shift)
    else:
        sigmas = sigmas_or_num_steps.float()
    num_steps = len(sigmas) - 1
    _check_window(window, num_steps)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1] (0.4 for Flash, 0.2 for Flash*), got {ratio}")
    stop = window.stop
    if stop == num_steps:
        return sigmas.clone()
    num_points = max(int((num_steps - stop + 1) * ratio), 2)
    s_stop = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[stop].item()
    post = _shift_time(torch.linspace(s_stop, 0.0, num_points, dtype=torch.float64), shift).float()
    if abs(post[0].item() - sigmas[stop].item()) > 1e-6:
        raise ValueError(
            f"sigmas[{stop}] = {sigmas[stop].item():.6f} but the shift-{shift} schedule gives {post[0].item():.6f}: "
            "build sigmas with flow_sigmas(num_steps, shift) using the same shift"
        )
    return torch.cat([sigmas[: stop + 1], post[1:].to(sigmas.device)])


# --------------------------------------------------------------------------------------------------
# Step rules


@dataclass(frozen=True)
class StepOutput:
    """One Gaussian step x_next ~ N(mean, std^2)."""

    sample: Tensor  # x_next, input dtype
    mean: Tensor  # mu, float32
    std: Tensor  # 0-dim float32, the std of x_next (e.g. std_t*sqrt(-dt))
    log_prob: Tensor  # [B] float32, mean over non-batch elements of log N(x_next; mu, std^2)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """mean over non-batch elements of -(x_next - mu)^2/(2 s^2) - log s - log sqrt(2 pi); x_next detached."""
    x_next = x_next.detach().float()
    log_prob = -((x_next - mean) ** 2) / (2.0 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def draw_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """eps ~ N(0, I) in float32, drawn on the generator's device and moved to ``device``.

    A CPU generator thus gives the same noise whether the latents live on the CPU or a GPU.
    """
    source = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=source).to(device)


def _draw_batch_noise(shape: torch.Size, generator: torch.Generator | Sequence[torch.Generator] | None,
                      device: torch.device) -> Tensor:
    """``draw_noise`` for the batch; with K generators each draws B/K consecutive rows."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw_noise(shape, generator, device)
    if len(generator) == 0 or shape[0] % len(generator):
        raise ValueError(f"{len(generator)} generators cannot split a batch of {shape[0]} rows evenly: "
                         "give one generator per group (or a single generator)")
    rows = shape[0] // len(generator)
    return torch.cat([draw_noise((rows, *shape[1:]), g, device) for g in generator])


def _step_interval(sigmas: Tensor, i: int) -> tuple[Tensor, Tensor]:
    if not 0 <= i < len(sigmas) - 1:
        raise ValueError(f"step index {i} is outside the {len(sigmas) - 1}-step schedule")
    sigma = sigmas[i].float()
    return sigma, sigmas[i + 1].float() - sigma


def _gaussian_step(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    noise: Tensor | None,
    prev_sample: Tensor | None,
    generator: torch.Generator | None,
) -> StepOutput:
    """Draw x_next = mean + std*eps (or take prev_sample) and score it; the log-prob is of the returned sample."""
    sources = {"noise": noise, "prev_sample": prev_sample, "generator": generator}
    given = [name for name, value in sources.items() if value is not None]
    if len(given) > 1:
        raise ValueError(
            f"pass at most one of noise, prev_sample, generator (got {', '.join(given)}): "
            "noise/generator to sample, prev_sample to score a given x_next"
        )
    for name, value in (("noise", noise), ("prev_sample", prev_sample)):
        if value is not None and value.shape != x.shape:
            raise ValueError(f"{name} must have the latent's shape {tuple(x.shape)}, got {tuple(value.shape)}")
    if prev_sample is None:
        if noise is None:
            noise = draw_noise(x.shape, generator, x.device)
        prev_sample = (mean + std * noise.float()).to(x.dtype)
    return StepOutput(sample=prev_sample, mean=mean, std=std, log_prob=gaussian_log_prob(prev_sample, mean, std))


def _check_eta(eta: float) -> None:
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for an SDE step (0.7 MixGRPO, 0.3 DanceGRPO), got {eta}")


def ode_step(x: Tensor, v: Tensor, sigmas: Tensor, i: int) -> Tensor:
    """Euler: x_next = x + (sigmas[i+1] - sigmas[i])*v."""
    _, dt = _step_interval(sigmas, i)
    return (x.float() + dt * v.float()).to(x.dtype)


def sde_step(
    x: Tensor,
    v: Tensor,
    sigmas: Tensor,
    i: int,
    eta: float,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """MixGRPO / Flow-GRPO SDE step (spec §3).

    std_t = eta*sqrt(sigma/(1 - sigma)), with sigma -> sigmas[1] in the denominator at sigma = 1;
    mu = x*(1 + std_t^2*dt/(2 sigma)) + v*(1 + std_t^2*(1 - sigma)/(2 sigma))*dt;
    x_next = mu + std_t*sqrt(-dt)*eps, so std = std_t*sqrt(-dt).
    """
    _check_eta(eta)
    sigma, dt = _step_interval(sigmas, i)
    denominator_sigma = torch.where(sigma == 1.0, sigmas[1].float(), sigma)
    std_t = eta * torch.sqrt(sigma / (1.0 - denominator_sigma))
    x32, v32 = x.float(), v.float()
    mean = x32 * (1.0 + std_t**2 * dt / (2.0 * sigma)) + v32 * (1.0 + std_t**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    return _gaussian_step(x, mean, std_t * torch.sqrt(-dt), noise, prev_sample, generator)


def dance_sde_step(
    x: Tensor,
    v: Tensor,
    sigmas: Tensor,
    i: int,
    eta: float,
    *,
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """DanceGRPO SDE step (spec §3).

    x0 = x - sigma*v, score = -(x - (1 - sigma)*x0)/sigma^2,
    mu = x + dt*v - 0.5*eta^2*score*dt, x_next = mu + eta*sqrt(-dt)*eps, so std = eta*sqrt(-dt).
    """
    _check_eta(eta)
    sigma, dt = _step_interval(sigmas, i)
    x32, v32 = x.float(), v.float()
    x0 = x32 - sigma * v32
    score = -(x32 - (1.0 - sigma) * x0) / sigma**2
    mean = x32 + dt * v32 - 0.5 * eta**2 * score * dt
    return _gaussian_step(x, mean, eta * torch.sqrt(-dt), noise, prev_sample, generator)


_SDE_STEPS = {"flow": sde_step, "dance": dance_sde_step}


# --------------------------------------------------------------------------------------------------
# Rollout


@dataclass(frozen=True)
class Rollout:
    """A mixed ODE-SDE trajectory: what the trainer needs to recompute the window's log-probs."""

    sample: Tensor  # final latent, at sigmas[-1] = 0
    latents: Tensor  # [B, len(window)+1, ...]: x at sigmas[window.start] ... sigmas[window.stop]
    log_probs: Tensor  # [B, len(window)] float32, log-probs of the window's SDE steps
    window: range  # the SDE steps (indices into ``sigmas``)
    sigmas: Tensor  # the schedule actually stepped (compressed after the window for dpmsolver++)
    nfe: int  # velocity evaluations along one trajectory
    row_evals: int  # rows passed through velocity_fn over all calls
    pred_x0: Tensor  # x0 = x - sigma*v of the final step (float32)


def _check_rollout_options(
    sde_type: str, post_solver: str, solver_order: int, solver_type: str, post_ratio: float | None
) -> None:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"sde_type must be one of {SDE_TYPES} ('flow' = MixGRPO/Flow-GRPO), got {sde_type!r}")
    if post_solver not in POST_SOLVERS:
        raise ValueError(f"post_solver must be one of {POST_SOLVERS} ('dpmsolver++' = Flash), got {post_solver!r}")
    if post_solver == "euler" and post_ratio is not None:
        raise ValueError("post_ratio only applies to post_solver='dpmsolver++'; pass post_ratio=None with 'euler'")
    if post_solver == "dpmsolver++":
        if post_ratio is None:
            raise ValueError("post_solver='dpmsolver++' needs post_ratio (0.4 for Flash, 0.2 for Flash*)")
        if solver_order not in SOLVER_ORDERS:
            raise ValueError(f"solver_order must be one of {SOLVER_ORDERS} (2 for Flash), got {solver_order!r}")
        if solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type must be one of {SOLVER_TYPES} ('midpoint' for Flash), got {solver_type!r}")


def _group_rows(latents: Tensor, group_size: int) -> Tensor:
    """Row indices arange(0, B, N) standing for each group; checks every group starts from one latent."""
    batch = latents.shape[0]
    if group_size < 1 or batch % group_size != 0:
        raise ValueError(f"group_size must divide the batch size {batch}, got {group_size}")
    groups = latents.reshape(batch // group_size, group_size, *latents.shape[1:])
    if not torch.equal(groups, groups[:, :1].expand_as(groups)):
        raise ValueError(
            "group_size is set but the rows of a group differ: a shared prefix needs the same initial noise "
            "for every row of a group (init_same_noise); pass group_size=None otherwise"
        )
    return torch.arange(0, batch, group_size, device=latents.device)


def mixed_rollout(
    velocity_fn: VelocityFn,
    latents: Tensor,
    sigmas: Tensor,
    window: range,
    eta: float,
    *,
    sde_type: SdeType = "flow",
    post_solver: PostSolver = "euler",
    solver_order: int = 2,
    solver_type: SolverType = "midpoint",
    post_ratio: float | None = None,
    shift: float = 3.0,
    group_size: int | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Rollout:
    """Sample with Euler ODE steps before ``window``, SDE steps inside it, and ``post_solver`` after it.

    - ``velocity_fn(x, sigma) -> v``, ``sigma`` the 0-dim float32 schedule value.
    - ``post_solver="dpmsolver++"`` (MixGRPO-Flash): DPM-Solver++ of ``solver_order`` on
      ``flash_sigmas(sigmas, shift, window, post_ratio)``; its x0 history is filled from the first step on.
    - SDE noise: ``draw_noise(latents.shape, generator, ...)`` (float32 ``torch.randn`` on the generator's
      device) once per window step for the full batch, so shared and unshared rollouts draw the same noise.
      A sequence of K generators draws B/K consecutive rows each (one generator per group: a group's
      noise then does not depend on which other groups share the batch).
    - ``group_size=N`` (shared prefix): rows are G groups of N identical latents (group-major); the steps
      before the window run once per group as ``velocity_fn(x[G], sigma, rows=arange(0, B, N))`` and the
      trajectories branch at the window start. Same result as without it, G*(l + N*(T - l)) row
      evaluations instead of B*T.
    - ``nfe`` counts the calls actually made along one trajectory: T for the Euler post-solver; for Flash
      window.stop - 1 + n (n from ``flash_sigmas``), e.g. 7 for Flash* (window range(0, 4), ratio 0.2), one
      fewer than the paper's l + w + (T - l - w)*r = 8.
    No gradient handling here: wrap in ``torch.no_grad()`` when sampling old-policy trajectories.
    """
    _check_rollout_options(sde_type, post_solver, solver_order, solver_type, post_ratio)
    sigmas = sigmas.float()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule of T+1 >= 2 values (flow_sigmas), got {tuple(sigmas.shape)}")
    _check_window(window, len(sigmas) - 1)
    if len(window) > 0:
        _check_eta(eta)
    if latents.ndim < 2:
        raise ValueError(f"latents must have shape (B, ...) with a non-batch dim, got {tuple(latents.shape)}")
    schedule = sigmas if post_solver == "euler" else flash_sigmas(sigmas, shift, window, post_ratio)
    sde = _SDE_STEPS[sde_type]

    rows = _group_rows(latents, group_size) if group_size is not None else None
    x = latents if rows is None else latents[rows]
    history: list[Tensor] = []  # DPM-Solver++ data predictions, newest last
    window_latents: list[Tensor] = []
    log_probs: list[Tensor] = []
    row_evals = 0
    num_steps = len(schedule) - 1
    for i in range(num_steps):
        if i == window.start:
            if rows is not None:  # branch the shared prefix into the group's N trajectories
                x = x.repeat_interleave(group_size, dim=0)
                history = [h.repeat_interleave(group_size, dim=0) for h in history]
                rows = None
            window_latents.append(x)
        sigma = schedule[i]
        v = velocity_fn(x, sigma) if rows is None else velocity_fn(x, sigma, rows=rows)
        row_evals += x.shape[0]
        pred_x0 = data_prediction(x, v, sigma)
        if post_solver == "dpmsolver++":
            history = (history + [pred_x0])[-solver_order:]
        if i in window:
            noise = _draw_batch_noise(latents.shape, generator, latents.device)
            step = sde(x, v, schedule, i, eta, noise=noise)
            x = step.sample
            window_latents.append(x)
            log_probs.append(step.log_prob)
        elif i < window.start or post_solver == "euler":
            x = ode_step(x, v, schedule, i)
        else:
            x = dpm_solver_step(x, history, schedule, i, solver_order, solver_type)
    if window.start == num_steps:  # empty window at the very end: nothing was stepped after it
        if rows is not None:
            x = x.repeat_interleave(group_size, dim=0)
            pred_x0 = pred_x0.repeat_interleave(group_size, dim=0)
        window_latents.append(x)

    empty = latents.new_zeros((len(latents), 0), dtype=torch.float32)
    return Rollout(
        sample=x,
        latents=torch.stack(window_latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1) if log_probs else empty,
        window=window,
        sigmas=schedule,
        nfe=num_steps,
        row_evals=row_evals,
        pred_x0=pred_x0,
    )
