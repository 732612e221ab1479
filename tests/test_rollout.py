"""mixed_rollout: NFE counts, window bookkeeping, the shared prefix, Flash against diffusers, bad input."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from gaussian_flow import gaussian_velocity

from mixgrpo.sampling import dance_sde_step, flash_sigmas, flow_sigmas, mixed_rollout, ode_step, sde_step

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warning inside diffusers

T, SHIFT, SCALE, ETA = 25, 3.0, 0.7, 0.7
GROUPS, GROUP_SIZE = 2, 3
BATCH = GROUPS * GROUP_SIZE


class Field:
    """Per-row analytic velocity (row r flows to N(means[r], SCALE^2)) that counts its calls."""

    def __init__(self, means: torch.Tensor, group_size: int | None = None):
        self.means = means
        self.group_size = group_size
        self.calls = 0
        self.row_evals = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        assert sigma.ndim == 0 and sigma.dtype == torch.float32
        if rows is not None:
            assert torch.equal(rows, torch.arange(0, len(self.means), self.group_size))
        means = self.means if rows is None else self.means[rows]
        assert len(means) == len(x)
        self.calls += 1
        self.row_evals += len(x)
        return gaussian_velocity(x, sigma, means, SCALE)


def grouped_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """G prompts x N images: each group shares its initial noise and its target mean (group-major rows)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(GROUPS, 4, 16, generator=g).repeat_interleave(GROUP_SIZE, dim=0)
    means = 0.5 * torch.randn(GROUPS, 1, 16, generator=g).repeat_interleave(GROUP_SIZE, dim=0)
    return noise, means


def gen(seed: int = 123) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flash_nfe(left: int) -> int:
    """Velocity calls of a Flash rollout with window range(left, left + 4), ratio 0.4."""
    return left + 3 + int((T - (left + 3)) * 0.4)


# ---------------------------------------------------------------------------------------------- bookkeeping


@pytest.mark.parametrize("sde_type", ["flow", "dance"])
def test_window_latents_and_log_probs_rescore_exactly(sde_type):
    latents, means = grouped_inputs()
    field, sigmas, window = Field(means), flow_sigmas(T, SHIFT), range(8, 12)
    out = mixed_rollout(field, latents, sigmas, window, ETA, sde_type=sde_type, generator=gen())
    assert out.latents.shape == (BATCH, 5, 4, 16) and out.log_probs.shape == (BATCH, 4)
    assert out.window == window and torch.equal(out.sigmas, sigmas)
    step = {"flow": sde_step, "dance": dance_sde_step}[sde_type]
    for k, i in enumerate(window):
        x = out.latents[:, k]
        rescored = step(x, field(x, sigmas[i]), sigmas, i, ETA, prev_sample=out.latents[:, k + 1])
        assert torch.equal(rescored.log_prob, out.log_probs[:, k])
    # steps before the window are Euler from the initial noise
    x = latents
    for i in range(window.start):
        x = ode_step(x, field(x, sigmas[i]), sigmas, i)
    assert torch.equal(out.latents[:, 0], x)
    # steps after it are Euler from the window's last latent
    x = out.latents[:, -1]
    for i in range(window.stop, T):
        x = ode_step(x, field(x, sigmas[i]), sigmas, i)
    assert torch.equal(out.sample, x)
    torch.testing.assert_close(out.pred_x0, out.sample)  # last Euler step to sigma = 0 lands on x0


def test_empty_window_is_plain_ode_sampling():
    latents, means = grouped_inputs()
    field, sigmas = Field(means), flow_sigmas(T, SHIFT)
    out = mixed_rollout(field, latents, sigmas, range(0, 0), 0.0)
    x = latents
    for i in range(T):
        x = ode_step(x, field(x, sigmas[i]), sigmas, i)
    assert torch.equal(out.sample, x)
    assert out.log_probs.shape == (BATCH, 0) and out.latents.shape == (BATCH, 1, 4, 16)
    assert torch.equal(out.latents[:, 0], latents) and out.nfe == T


def test_generator_seed_determines_the_rollout():
    latents, means = grouped_inputs()
    sigmas = flow_sigmas(T, SHIFT)
    a, b, c = (mixed_rollout(Field(means), latents, sigmas, range(3, 7), ETA, generator=gen(s)) for s in (1, 1, 2))
    assert torch.equal(a.sample, b.sample) and torch.equal(a.log_probs, b.log_probs)
    assert not torch.equal(a.sample, c.sample)
    # the SDE really branches the N copies of a group apart
    assert not torch.equal(a.sample[0], a.sample[1])


# ---------------------------------------------------------------------------------------------- NFE


def test_nfe_mixgrpo_and_dancegrpo_is_25():
    latents, means = grouped_inputs()
    for window, sde_type in ((range(0, 4), "flow"), (range(0, T), "dance")):
        field = Field(means)
        out = mixed_rollout(field, latents, flow_sigmas(T, SHIFT), window, ETA, sde_type=sde_type, generator=gen())
        assert out.nfe == field.calls == 25
        assert out.row_evals == BATCH * 25
        assert out.log_probs.shape == (BATCH, len(window))


@pytest.mark.parametrize("left", range(0, 18))
def test_nfe_flash_progressive_windows(left):
    latents, means = grouped_inputs()
    field = Field(means)
    out = mixed_rollout(
        field, latents, flow_sigmas(T, SHIFT), range(left, left + 4), ETA,
        post_solver="dpmsolver++", post_ratio=0.4, generator=gen(),
    )
    assert out.nfe == field.calls == flash_nfe(left)
    assert torch.equal(out.sigmas, flash_sigmas(T, SHIFT, range(left, left + 4), 0.4))
    assert out.sigmas[-1].item() == 0.0


def test_nfe_flash_exact_counts():
    assert [flash_nfe(left) for left in (0, 5, 10, 17)] == [11, 14, 17, 22]
    # late windows: the reference's n = int(max(1.2, 1)) = 1 would stop at sigma[23]; we step on to 0
    latents, means = grouped_inputs()
    field = Field(means)
    out = mixed_rollout(
        field, latents, flow_sigmas(T, SHIFT), range(19, 23), ETA,
        post_solver="dpmsolver++", post_ratio=0.4, generator=gen(),
    )
    assert out.nfe == field.calls == 24 and out.sigmas[-1].item() == 0.0


def test_nfe_flash_star_is_7():
    latents, means = grouped_inputs()
    field = Field(means)
    out = mixed_rollout(
        field, latents, flow_sigmas(T, SHIFT), range(0, 4), ETA,
        post_solver="dpmsolver++", post_ratio=0.2, generator=gen(),
    )
    assert out.nfe == field.calls == 7  # the paper's l + w + (T - l - w)*r counts 8


# ---------------------------------------------------------------------------------------------- shared prefix


@pytest.mark.parametrize("left", [0, 8])
@pytest.mark.parametrize("post_solver, post_ratio", [("euler", None), ("dpmsolver++", 0.4)])
def test_shared_prefix_equals_unshared_with_fewer_row_evaluations(left, post_solver, post_ratio):
    latents, means = grouped_inputs()
    sigmas, window = flow_sigmas(T, SHIFT), range(left, left + 4)
    kwargs = dict(post_solver=post_solver, post_ratio=post_ratio)
    plain_field, shared_field = Field(means), Field(means, GROUP_SIZE)
    plain = mixed_rollout(plain_field, latents, sigmas, window, ETA, generator=gen(), **kwargs)
    shared = mixed_rollout(
        shared_field, latents, sigmas, window, ETA, generator=gen(), group_size=GROUP_SIZE, **kwargs
    )
    for name in ("sample", "latents", "log_probs", "sigmas", "pred_x0"):
        torch.testing.assert_close(getattr(shared, name), getattr(plain, name), atol=1e-6, rtol=0, msg=name)
    steps = plain.nfe
    assert shared.nfe == steps
    assert plain.row_evals == plain_field.row_evals == GROUPS * GROUP_SIZE * steps
    assert shared.row_evals == shared_field.row_evals == GROUPS * (left + GROUP_SIZE * (steps - left))
    assert (shared.row_evals < plain.row_evals) == (left > 0)


def test_shared_prefix_with_an_empty_window_at_the_end():
    latents, means = grouped_inputs()
    sigmas = flow_sigmas(T, SHIFT)
    plain = mixed_rollout(Field(means), latents, sigmas, range(T, T), 0.0)
    shared = mixed_rollout(Field(means, GROUP_SIZE), latents, sigmas, range(T, T), 0.0, group_size=GROUP_SIZE)
    assert torch.equal(shared.sample, plain.sample) and torch.equal(shared.latents, plain.latents)
    assert torch.equal(shared.pred_x0, plain.pred_x0) and shared.row_evals == GROUPS * T


def test_shared_prefix_rejects_groups_with_different_noise():
    latents, means = grouped_inputs()
    latents[1] += 1e-3
    with pytest.raises(ValueError, match="rows of a group differ"):
        mixed_rollout(
            Field(means, GROUP_SIZE), latents, flow_sigmas(T, SHIFT), range(8, 12), ETA, group_size=GROUP_SIZE
        )
    with pytest.raises(ValueError, match="group_size must divide the batch size 6"):
        mixed_rollout(Field(means, 4), latents, flow_sigmas(T, SHIFT), range(8, 12), ETA, group_size=4)


# ---------------------------------------------------------------------------------------------- Flash vs diffusers


@pytest.mark.parametrize("order, solver_type", [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")])
@pytest.mark.parametrize("window, ratio", [(range(0, 4), 0.2), (range(6, 10), 0.4), (range(5, 5), 1.0)])
def test_flash_rollout_matches_diffusers_dpmsolver(order, solver_type, window, ratio):
    """diffusers' scheduler sees every model output (its history), but its sample is used only after the window."""
    latents, means = grouped_inputs()
    field = Field(means)
    out = mixed_rollout(
        field, latents, flow_sigmas(T, SHIFT), window, ETA, post_solver="dpmsolver++",
        solver_order=order, solver_type=solver_type, post_ratio=ratio, generator=gen(),
    )
    schedule = flash_sigmas(T, SHIFT, window, ratio)
    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, algorithm_type="dpmsolver++", solver_type=solver_type,
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(len(schedule) - 1)
    scheduler.sigmas = schedule.clone()
    scheduler.set_begin_index(0)
    noise_source = gen()
    x = latents
    for i, t in enumerate(scheduler.timesteps):
        v = field(x, schedule[i])
        theirs = scheduler.step(v, t, x).prev_sample
        if i < window.start:
            x = x + (schedule[i + 1] - schedule[i]) * v
        elif i in window:
            noise = torch.randn(latents.shape, generator=noise_source, dtype=torch.float32)
            x = sde_step(x, v, schedule, i, ETA, noise=noise).sample
        else:
            x = theirs
    torch.testing.assert_close(out.sample, x, atol=2e-5, rtol=1e-5)


def test_flash_window_log_probs_equal_the_uncompressed_recompute():
    latents, means = grouped_inputs()
    field, window = Field(means), range(6, 10)
    out = mixed_rollout(
        field, latents, flow_sigmas(T, SHIFT), window, ETA, post_solver="dpmsolver++", post_ratio=0.4, generator=gen()
    )
    full = flow_sigmas(T, SHIFT)  # the trainer recomputes on the uncompressed schedule
    for k, i in enumerate(window):
        x = out.latents[:, k]
        rescored = sde_step(x, field(x, full[i]), full, i, ETA, prev_sample=out.latents[:, k + 1])
        assert torch.equal(rescored.log_prob, out.log_probs[:, k])


# ---------------------------------------------------------------------------------------------- bad input

FLASH = {"post_solver": "dpmsolver++", "post_ratio": 0.4}


@pytest.mark.parametrize(
    "window, eta, kwargs, message",
    [
        (range(23, 27), ETA, {}, "beyond the 25-step schedule"),
        (range(0, 8, 2), ETA, {}, "range with step 1"),
        (range(0, 4), 0.0, {}, "eta must be > 0"),
        (range(0, 4), ETA, {"sde_type": "ddim"}, "sde_type must be one of"),
        (range(0, 4), ETA, {"post_solver": "unipc"}, "post_solver must be one of"),
        (range(0, 4), ETA, {"post_solver": "dpmsolver++"}, "needs post_ratio"),
        (range(0, 4), ETA, {"post_ratio": 0.4}, "post_ratio only applies"),
        (range(0, 4), ETA, {**FLASH, "solver_order": 4}, "solver_order must be"),
        (range(0, 4), ETA, {**FLASH, "solver_type": "bh2"}, "solver_type must be"),
        (range(0, 4), ETA, {**FLASH, "post_ratio": 1.5}, "ratio must be in"),
        (range(0, 4), ETA, {**FLASH, "shift": 1.0}, "same shift"),
        (range(0, 0), 0.0, {"latents": torch.zeros(6)}, "non-batch dim"),
    ],
)
def test_rejects_bad_input(window, eta, kwargs, message):
    latents, means = grouped_inputs()
    kwargs = dict(kwargs)
    latents = kwargs.pop("latents", latents)
    with pytest.raises(ValueError, match=message):
        mixed_rollout(Field(means), latents, flow_sigmas(T, SHIFT), window, eta, **kwargs)


def test_one_generator_per_group_matches_separate_group_rollouts():
    """A batch of G groups with G generators = G one-group rollouts with those generators."""
    latents, means = grouped_inputs()
    sigmas, window = flow_sigmas(T, SHIFT), range(3, 7)
    batched = mixed_rollout(Field(means, GROUP_SIZE), latents, sigmas, window, ETA, group_size=GROUP_SIZE,
                            generator=[gen(10 + g) for g in range(GROUPS)])
    for g in range(GROUPS):
        rows = slice(g * GROUP_SIZE, (g + 1) * GROUP_SIZE)
        alone = mixed_rollout(Field(means[rows], GROUP_SIZE), latents[rows], sigmas, window, ETA,
                              group_size=GROUP_SIZE, generator=gen(10 + g))
        torch.testing.assert_close(batched.sample[rows], alone.sample, atol=1e-6, rtol=0)
        torch.testing.assert_close(batched.log_probs[rows], alone.log_probs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot split a batch of 6 rows evenly"):
        mixed_rollout(Field(means), latents, sigmas, window, ETA, generator=[gen(1), gen(2), gen(3), gen(4)])
