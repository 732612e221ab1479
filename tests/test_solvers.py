"""DPM-Solver++ multistep (mixgrpo.solvers) against diffusers' DPMSolverMultistepScheduler on flow schedules."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from gaussian_flow import gaussian_flow_endpoint, gaussian_velocity

from mixgrpo.sampling import flow_sigmas, ode_step
from mixgrpo.solvers import data_prediction, dpm_solver_step, first_order_update, step_order

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warning inside diffusers

SCALE = 0.7
CONFIGS = [(1, "midpoint"), (2, "midpoint"), (2, "heun"), (3, "midpoint")]


def problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(3, 1, 16, generator=g), torch.randn(3, 4, 16, generator=g)


def diffusers_scheduler(num_steps: int, order: int, solver_type: str, sigmas: torch.Tensor | None):
    """Flow-matching DPM-Solver++; ``sigmas`` (T+1 values ending at 0) replaces its own flow schedule."""
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=order,
        algorithm_type="dpmsolver++",
        solver_type=solver_type,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(num_steps)
    if sigmas is not None:
        assert len(sigmas) == len(scheduler.sigmas)
        scheduler.sigmas = sigmas.clone()
    scheduler.set_begin_index(0)  # step by position, so the timestep values play no part
    return scheduler


def run_both(sigmas_override, num_steps: int, order: int, solver_type: str):
    mean, x = problem()
    scheduler = diffusers_scheduler(num_steps, order, solver_type, sigmas_override)
    sigmas = scheduler.sigmas
    ours, theirs, history = x, x, []
    for i, t in enumerate(scheduler.timesteps):
        v = gaussian_velocity(ours, sigmas[i], mean, SCALE)
        history = (history + [data_prediction(ours, v, sigmas[i])])[-order:]
        ours = dpm_solver_step(ours, history, sigmas, i, order, solver_type)
        theirs = scheduler.step(gaussian_velocity(theirs, sigmas[i], mean, SCALE), t, theirs).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5, msg=f"step {i}")
    return ours, mean, x


@pytest.mark.parametrize("order, solver_type", CONFIGS)
@pytest.mark.parametrize("num_steps", [25, 10])
def test_matches_diffusers_on_its_flow_schedule(order, solver_type, num_steps):
    run_both(None, num_steps, order, solver_type)


@pytest.mark.parametrize("order, solver_type", CONFIGS)
@pytest.mark.parametrize("num_steps", [25, 8])
def test_matches_diffusers_on_the_mixgrpo_schedule_below_sigma_one(order, solver_type, num_steps):
    # flow_sigmas(T+1, 3) without its first value: the MixGRPO schedule from sigma_1 on
    run_both(flow_sigmas(num_steps + 1, 3.0)[1:], num_steps, order, solver_type)


@pytest.mark.parametrize("order, solver_type", CONFIGS[:3])
def test_matches_diffusers_on_the_full_mixgrpo_schedule(order, solver_type):
    run_both(flow_sigmas(25, 3.0), 25, order, solver_type)


def test_first_order_is_the_euler_step():
    sigmas = flow_sigmas(25, 3.0)
    mean, x = problem(1)
    for i in (0, 7, 24):
        v = gaussian_velocity(x, sigmas[i], mean, SCALE)
        x0 = data_prediction(x, v, sigmas[i])
        torch.testing.assert_close(first_order_update(x, x0, sigmas[i], sigmas[i + 1]), ode_step(x, v, sigmas, i))


def test_sigma_one_history_entry_has_no_weight():
    """At sigma_0 = 1 (lambda = -inf) the multistep correction vanishes; order 3 at step 2 = order 2."""
    sigmas = flow_sigmas(25, 3.0)
    _, x = problem(2)
    m = [torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    third = dpm_solver_step(x, m, sigmas, 2, order=3)
    second = dpm_solver_step(x, m[1:], sigmas, 2, order=2)
    assert torch.isfinite(third).all()
    assert torch.equal(third, second)
    # and with a schedule that stays below 1 the third entry does change the step
    below = flow_sigmas(26, 3.0)[1:]
    assert not torch.allclose(dpm_solver_step(x, m, below, 2, order=3), dpm_solver_step(x, m[1:], below, 2, order=2))


def test_step_order_rules():
    sigmas = flow_sigmas(25, 3.0)
    assert [step_order(sigmas, i, 3, min(i + 1, 3)) for i in range(25)] == [1, 1, 2] + [3] * 21 + [1]
    short = flow_sigmas(8, 3.0)  # < 15 steps: penultimate step at most second order
    assert [step_order(short, i, 3, min(i + 1, 3)) for i in range(8)] == [1, 1, 2, 3, 3, 3, 2, 1]
    assert [step_order(sigmas, i, 2, 1) for i in (5, 24)] == [1, 1]


def test_higher_order_is_more_accurate_than_euler_at_equal_cost():
    mean, x = problem(3)
    exact = gaussian_flow_endpoint(x, mean, SCALE)
    sigmas = flow_sigmas(10, 3.0)
    errors = {}
    for order in (1, 2, 3):
        sample, history = x, []
        for i in range(10):
            v = gaussian_velocity(sample, sigmas[i], mean, SCALE)
            history = (history + [data_prediction(sample, v, sigmas[i])])[-order:]
            sample = dpm_solver_step(sample, history, sigmas, i, order)
        errors[order] = (sample - exact).abs().max().item()
    assert errors[2] < 0.6 * errors[1] and errors[3] < 0.6 * errors[1]


def test_bf16_state_keeps_its_dtype():
    sigmas = flow_sigmas(10, 3.0)
    _, x = problem(4)
    x0 = torch.randn_like(x)
    assert dpm_solver_step(x.bfloat16(), [x0, x0], sigmas, 3, 2).dtype == torch.bfloat16


def test_rejects_bad_arguments():
    sigmas = flow_sigmas(10, 3.0)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="solver order must be one of"):
        dpm_solver_step(x, [x], sigmas, 3, order=4)
    with pytest.raises(ValueError, match="solver_type must be one of"):
        dpm_solver_step(x, [x], sigmas, 3, solver_type="bh2")
    with pytest.raises(ValueError, match="x0_history must hold 1..2"):
        dpm_solver_step(x, [x, x, x], sigmas, 1, order=3)
    with pytest.raises(ValueError, match="x0_history must hold"):
        dpm_solver_step(x, [], sigmas, 1)
    with pytest.raises(ValueError, match="outside the 10-step schedule"):
        dpm_solver_step(x, [x], sigmas, 10)
