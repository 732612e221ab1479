"""Schedule and step rules of mixgrpo.sampling against the spec's numbers, closed forms and diffusers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from gaussian_flow import gaussian_flow_endpoint, gaussian_velocity

from mixgrpo.sampling import dance_sde_step, flash_sigmas, flow_sigmas, ode_step, sde_step

T, SHIFT = 25, 3.0


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- schedule


def test_flow_sigmas_matches_the_spec_values():
    sigmas = flow_sigmas(T, SHIFT)
    assert sigmas.shape == (T + 1,) and sigmas.dtype == torch.float32
    expected_head = [1.0, 0.9863, 0.9718, 0.9565, 0.9403]
    expected_tail = [0.2903, 0.2069, 0.1111, 0.0]
    assert sigmas[:5].tolist() == pytest.approx(expected_head, abs=5e-5)
    assert sigmas[-4:].tolist() == pytest.approx(expected_tail, abs=5e-5)
    s = np.linspace(1.0, 0.0, T + 1)
    np.testing.assert_allclose(sigmas.numpy(), 3 * s / (1 + 2 * s), atol=1e-7)
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_flow_sigmas_shift_one_is_linear():
    np.testing.assert_allclose(flow_sigmas(10, 1.0).numpy(), np.linspace(1, 0, 11), atol=1e-7)


@pytest.mark.parametrize("num_steps, shift", [(0, 3.0), (25, 0.0)])
def test_flow_sigmas_rejects_bad_arguments(num_steps, shift):
    with pytest.raises(ValueError, match="num_steps|shift"):
        flow_sigmas(num_steps, shift)


# ---------------------------------------------------------------------------------------------- ODE


def test_ode_trajectory_matches_diffusers_flow_match_euler():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, T + 1)[:-1].tolist())
    sigmas = flow_sigmas(T, SHIFT)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), sigmas.numpy(), atol=1e-6)

    mean, noise = rand(3, 1, 16, seed=1) * 0.5, rand(3, 4, 16, seed=2)
    x_ours = x_theirs = noise
    for i, t in enumerate(scheduler.timesteps):
        x_ours = ode_step(x_ours, gaussian_velocity(x_ours, sigmas[i], mean, 0.7), sigmas, i)
        v = gaussian_velocity(x_theirs, scheduler.sigmas[i], mean, 0.7)
        x_theirs = scheduler.step(v, t, x_theirs).prev_sample
        torch.testing.assert_close(x_ours, x_theirs, atol=1e-5, rtol=1e-5)
    # the field is really integrated: 25 Euler steps land within first-order error of m + c*z
    assert (x_ours - gaussian_flow_endpoint(noise, mean, 0.7)).abs().max() < 0.3


def test_ode_step_formula_and_dtype():
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(2, 8, seed=3), rand(2, 8, seed=4)
    torch.testing.assert_close(ode_step(x, v, sigmas, 5), x + (sigmas[6] - sigmas[5]) * v)
    out = ode_step(x.bfloat16(), v.bfloat16(), sigmas, 5)
    assert out.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="outside the 25-step schedule"):
        ode_step(x, v, sigmas, 25)


# ---------------------------------------------------------------------------------------------- SDE closed forms


def closed_form(kind: str, x, v, sigma: float, sigma_next: float, eta: float, sigma_for_denominator: float):
    """Spec §3 in float64, written as Euler + score drift: mu = x + v*dt - 0.5*g^2*score*dt.

    For x0 = x - sigma*v the score -(x - (1 - sigma)*x0)/sigma^2 simplifies to -(x + (1 - sigma)*v)/sigma.
    """
    x, v = x.double(), v.double()
    dt = sigma_next - sigma
    score = -(x + (1 - sigma) * v) / sigma
    if kind == "flow":
        g = eta * math.sqrt(sigma / (1 - sigma_for_denominator))
    else:
        g = eta
    mean = x + v * dt - 0.5 * g**2 * score * dt
    return mean, g * math.sqrt(-dt)


def normal_log_prob(x_next, mean, std) -> torch.Tensor:
    lp = torch.distributions.Normal(mean.double(), std).log_prob(x_next.double())
    return lp.flatten(1).mean(1)


STEPS = {"flow": sde_step, "dance": dance_sde_step}


@pytest.mark.parametrize("kind, eta", [("flow", 0.7), ("dance", 0.3)])
@pytest.mark.parametrize("i", [1, 7, 24])
def test_sde_mean_std_log_prob_match_closed_form(kind, eta, i):
    sigmas = flow_sigmas(T, SHIFT)
    x, v, eps = rand(3, 4, 5, seed=10), rand(3, 4, 5, seed=11), rand(3, 4, 5, seed=12)
    out = STEPS[kind](x, v, sigmas, i, eta, noise=eps)
    s, s_next = sigmas[i].item(), sigmas[i + 1].item()
    mean, std = closed_form(kind, x, v, s, s_next, eta, s)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    assert out.std.item() == pytest.approx(std, rel=1e-5)
    torch.testing.assert_close(out.sample.double(), mean + std * eps.double(), atol=1e-5, rtol=1e-5)
    assert out.log_prob.shape == (3,) and out.log_prob.dtype == torch.float32
    torch.testing.assert_close(out.log_prob.double(), normal_log_prob(out.sample, mean, std), atol=1e-4, rtol=1e-5)


def test_flow_sde_guard_at_sigma_one_uses_the_second_schedule_value():
    sigmas = torch.tensor([1.0, 0.9, 0.5, 0.0])
    x, v, eps = rand(2, 6, seed=20), rand(2, 6, seed=21), rand(2, 6, seed=22)
    out = sde_step(x, v, sigmas, 0, 0.7, noise=eps)
    mean, std = closed_form("flow", x, v, 1.0, 0.9, 0.7, sigma_for_denominator=0.9)
    assert math.isfinite(out.std.item())
    assert out.std.item() == pytest.approx(0.7 * math.sqrt(1.0 / 0.1) * math.sqrt(0.1), rel=1e-6)
    assert out.std.item() == pytest.approx(std, rel=1e-6)
    torch.testing.assert_close(out.mean.double(), mean, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out.log_prob).all()


def test_flow_sde_equals_euler_plus_noise_in_the_mean_for_small_eta():
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(2, 6, seed=23), rand(2, 6, seed=24)
    out = sde_step(x, v, sigmas, 4, 1e-4, noise=torch.zeros(2, 6))
    torch.testing.assert_close(out.mean, ode_step(x, v, sigmas, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind, eta, i", [("flow", 0.7, 0), ("flow", 0.7, 12), ("dance", 0.3, 3)])
def test_empirical_moments_match_mean_and_std(kind, eta, i):
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(4, 50_000, seed=30), rand(4, 50_000, seed=31)
    out = STEPS[kind](x, v, sigmas, i, eta, generator=torch.Generator().manual_seed(32))
    residual = (out.sample - out.mean) / out.std  # should be N(0, 1) over 200k elements
    assert abs(residual.mean().item()) < 5 / math.sqrt(residual.numel())
    assert residual.std().item() == pytest.approx(1.0, abs=0.01)
    # the expected per-element log-density of a standard draw: -1/2 - log s - log sqrt(2 pi)
    expected = -0.5 - math.log(out.std.item()) - 0.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(out.log_prob.numpy(), expected, atol=0.01)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_log_prob_of_prev_sample_equals_the_recorded_one(kind):
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(3, 2, 4, seed=40), rand(3, 2, 4, seed=41)
    sampled = STEPS[kind](x, v, sigmas, 6, 0.5, generator=torch.Generator().manual_seed(42))
    rescored = STEPS[kind](x, v, sigmas, 6, 0.5, prev_sample=sampled.sample)
    assert torch.equal(rescored.log_prob, sampled.log_prob)
    assert rescored.sample is sampled.sample
    # a different x_next scores lower on average: the log-prob really depends on prev_sample
    moved = STEPS[kind](x, v, sigmas, 6, 0.5, prev_sample=sampled.sample + 3 * sampled.std)
    assert (moved.log_prob < sampled.log_prob).all()


def test_log_prob_detaches_x_next_but_keeps_the_graph_through_the_mean():
    sigmas = flow_sigmas(T, SHIFT)
    x = rand(2, 8, seed=43)
    v = rand(2, 8, seed=44).requires_grad_()
    prev = rand(2, 8, seed=45).requires_grad_()
    out = sde_step(x, v, sigmas, 3, 0.7, prev_sample=prev)
    out.log_prob.sum().backward()
    assert prev.grad is None and v.grad is not None and v.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_noise_and_generator_are_deterministic_and_agree(kind):
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(2, 3, 4, seed=50), rand(2, 3, 4, seed=51)
    a = STEPS[kind](x, v, sigmas, 2, 0.7, generator=torch.Generator().manual_seed(7))
    b = STEPS[kind](x, v, sigmas, 2, 0.7, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32)
    c = STEPS[kind](x, v, sigmas, 2, 0.7, noise=eps)
    d = STEPS[kind](x, v, sigmas, 2, 0.7, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.sample, b.sample) and torch.equal(a.sample, c.sample)
    assert not torch.equal(a.sample, d.sample)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_bf16_in_bf16_out_and_rescoring_is_exact(kind):
    sigmas = flow_sigmas(T, SHIFT)
    x, v = rand(2, 16, seed=60).bfloat16(), rand(2, 16, seed=61).bfloat16()
    out = STEPS[kind](x, v, sigmas, 9, 0.7, generator=torch.Generator().manual_seed(62))
    assert out.sample.dtype == torch.bfloat16
    assert out.mean.dtype == out.log_prob.dtype == torch.float32
    # the log-prob is of the bf16 sample actually returned, so the trainer's recomputation matches
    assert torch.equal(STEPS[kind](x, v, sigmas, 9, 0.7, prev_sample=out.sample).log_prob, out.log_prob)


@pytest.mark.parametrize("kind", ["flow", "dance"])
def test_sde_step_rejects_bad_input(kind):
    sigmas = flow_sigmas(T, SHIFT)
    x = rand(2, 4)
    step = STEPS[kind]
    with pytest.raises(ValueError, match="at most one of noise, prev_sample, generator"):
        step(x, x, sigmas, 1, 0.7, noise=x, prev_sample=x)
    with pytest.raises(ValueError, match="at most one"):
        step(x, x, sigmas, 1, 0.7, noise=x, generator=torch.Generator())
    with pytest.raises(ValueError, match="eta must be > 0"):
        step(x, x, sigmas, 1, 0.0)
    with pytest.raises(ValueError, match="noise must have the latent's shape"):
        step(x, x, sigmas, 1, 0.7, noise=rand(2, 5))
    with pytest.raises(ValueError, match="outside the 25-step schedule"):
        step(x, x, sigmas, -1, 0.7)


# ---------------------------------------------------------------------------------------------- Flash schedules


def shifted(s: float) -> float:
    return 3 * s / (1 + 2 * s)


def test_flash_star_schedule():
    sigmas = flash_sigmas(T, SHIFT, range(0, 4), 0.2)
    # last = 3, n = int(22*0.2) = 4 points linspace(s[4] = 0.84, 0, 4) in unshifted time
    expected = flow_sigmas(T, SHIFT)[:4].tolist() + [shifted(s) for s in (0.84, 0.56, 0.28, 0.0)]
    assert len(sigmas) == 8
    assert sigmas.tolist() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("left", [0, 5, 10, 17])
def test_flash_schedule_lengths_and_values(left):
    full = flow_sigmas(T, SHIFT)
    sigmas = flash_sigmas(full, SHIFT, range(left, left + 4), 0.4)
    last = left + 3
    n = int((T - last) * 0.4)
    assert len(sigmas) == last + 1 + n
    assert torch.equal(sigmas[: last + 2], full[: last + 2])  # window steps untouched, incl. sigma[last+1]
    s_next = 1 - (last + 1) / T
    expected_post = [shifted(s) for s in np.linspace(s_next, 0.0, n)]
    assert sigmas[last + 1 :].tolist() == pytest.approx(expected_post, abs=1e-6)
    assert torch.equal(flash_sigmas(T, SHIFT, range(left, left + 4), 0.4), sigmas)


def test_flash_schedule_always_ends_at_zero():
    # reference: n = int(max(3*0.4, 1)) = 1 point would stop at sigma[23]; we keep 2 points down to 0
    sigmas = flash_sigmas(T, SHIFT, range(19, 23), 0.4)
    assert len(sigmas) == 25 and sigmas[-1].item() == 0.0 and sigmas[-2].item() == pytest.approx(0.2069, abs=1e-4)
    # window reaching the last step: nothing to compress
    assert torch.equal(flash_sigmas(T, SHIFT, range(0, 25), 0.4), flow_sigmas(T, SHIFT))


def test_flash_schedule_ratio_one_and_empty_window_gives_the_full_schedule():
    torch.testing.assert_close(flash_sigmas(T, SHIFT, range(0, 0), 1.0), flow_sigmas(T, SHIFT), atol=1e-7, rtol=0)
    torch.testing.assert_close(flash_sigmas(T, SHIFT, range(6, 6), 1.0), flow_sigmas(T, SHIFT), atol=1e-7, rtol=0)


def test_flash_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="beyond the 25-step schedule"):
        flash_sigmas(T, SHIFT, range(23, 27), 0.4)
    with pytest.raises(ValueError, match="step 1"):
        flash_sigmas(T, SHIFT, range(0, 8, 2), 0.4)
    with pytest.raises(ValueError, match="ratio must be in"):
        flash_sigmas(T, SHIFT, range(0, 4), 0.0)
    with pytest.raises(ValueError, match="same shift"):
        flash_sigmas(flow_sigmas(T, 1.0), SHIFT, range(0, 4), 0.4)
