"""DPM-Solver++ multistep (Lu et al. 2022, arXiv 2211.01095) for flow-matching schedules, as pure functions.

Flow matching writes ``x_sigma = alpha*x0 + sigma*eps`` with ``alpha = 1 - sigma``; the half log-SNR is
``lambda = log(alpha/sigma)`` and the model's velocity ``v`` gives the data prediction ``x0 = x - sigma*v``.
A step from ``s0 = sigmas[i]`` to ``t = sigmas[i+1]`` has ``h = lambda_t - lambda_s0``; the multistep
corrections use the data predictions of earlier steps (``m1`` at ``sigmas[i-1]``, ``m2`` at ``sigmas[i-2]``).
Coefficients are computed in float32 from 0-dim sigma tensors, as diffusers' ``DPMSolverMultistepScheduler``
does; ``sigma = 1`` gives ``lambda = -inf`` and ``sigma = 0`` gives ``lambda = +inf`` (both are limits the
formulas handle, see ``step_order``).
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

SolverType = Literal["midpoint", "heun"]
SOLVER_TYPES: tuple[str, ...] = ("midpoint", "heun")
SOLVER_ORDERS: tuple[int, ...] = (1, 2, 3)

# diffusers' ``lower_order_final``: schedules shorter than this keep the penultimate step at order <= 2.
LOWER_ORDER_SECOND_BELOW_STEPS = 15


def data_prediction(x: Tensor, v: Tensor, sigma: Tensor) -> Tensor:
    """x0 = x - sigma*v (float32)."""
    return x.float() - sigma.float() * v.float()


def flow_lambda(sigma: Tensor) -> Tensor:
    """lambda = log(alpha/sigma) with alpha = 1 - sigma (-inf at sigma = 1, +inf at sigma = 0)."""
    sigma = sigma.float()
    return torch.log(1.0 - sigma) - torch.log(sigma)


def first_order_update(x: Tensor, m0: Tensor, sigma_s0: Tensor, sigma_t: Tensor) -> Tensor:
    """DPM-Solver++(1) = DDIM: x_t = (sigma_t/sigma_s0)*x - alpha_t*(exp(-h) - 1)*m0."""
    sigma_s0, sigma_t = sigma_s0.float(), sigma_t.float()
    h = flow_lambda(sigma_t) - flow_lambda(sigma_s0)
    alpha_t = 1.0 - sigma_t
    return (sigma_t / sigma_s0) * x - (alpha_t * torch.expm1(-h)) * m0


def second_order_update(
    x: Tensor,
    m0: Tensor,
    m1: Tensor,
    sigma_s1: Tensor,
    sigma_s0: Tensor,
    sigma_t: Tensor,
    solver_type: SolverType,
) -> Tensor:
    """DPM-Solver++(2M), r0 = h_0/h, D0 = m0, D1 = (m0 - m1)/r0:
    midpoint  x_t = (sigma_t/sigma_s0)*x - alpha_t*(e^-h - 1)*D0 - 0.5*alpha_t*(e^-h - 1)*D1
    heun      x_t = (sigma_t/sigma_s0)*x - alpha_t*(e^-h - 1)*D0 + alpha_t*((e^-h - 1)/h + 1)*D1
    """
    sigma_s1, sigma_s0, sigma_t = sigma_s1.float(), sigma_s0.float(), sigma_t.float()
    lambda_t, lambda_s0, lambda_s1 = flow_lambda(sigma_t), flow_lambda(sigma_s0), flow_lambda(sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d0, d1 = m0, (m0 - m1) / r0
    alpha_t = 1.0 - sigma_t
    phi_1 = torch.expm1(-h)  # e^-h - 1
    x_t = (sigma_t / sigma_s0) * x - (alpha_t * phi_1) * d0
    if solver_type == "midpoint":
        return x_t - (0.5 * alpha_t * phi_1) * d1
    if solver_type == "heun":
        return x_t + (alpha_t * (phi_1 / h + 1.0)) * d1
    raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")


def third_order_update(
    x: Tensor,
    m0: Tensor,
    m1: Tensor,
    m2: Tensor,
    sigma_s2: Tensor,
    sigma_s1: Tensor,
    sigma_s0: Tensor,
    sigma_t: Tensor,
) -> Tensor:
    """DPM-Solver++(3M), r0 = h_0/h, r1 = h_1/h, D1_0 = (m0 - m1)/r0, D1_1 = (m1 - m2)/r1,
    D1 = D1_0 + r0/(r0 + r1)*(D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0 + r1):
    x_t = (sigma_t/sigma_s0)*x - alpha_t*(e^-h - 1)*D0 + alpha_t*((e^-h - 1)/h + 1)*D1
          - alpha_t*((e^-h - 1 + h)/h^2 - 1/2)*D2
    """
    sigmas = [s.float() for s in (sigma_s2, sigma_s1, sigma_s0, sigma_t)]
    lambda_s2, lambda_s1, lambda_s0, lambda_t = (flow_lambda(s) for s in sigmas)
    h, h_0, h_1 = lambda_t - lambda_s0, lambda_s0 - lambda_s1, lambda_s1 - lambda_s2
    r0, r1 = h_0 / h, h_1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    alpha_t = 1.0 - sigmas[3]
    phi_1 = torch.expm1(-h)
    return (
        (sigmas[3] / sigmas[2]) * x
        - (alpha_t * phi_1) * m0
        + (alpha_t * (phi_1 / h + 1.0)) * d1
        - (alpha_t * ((phi_1 + h) / h**2 - 0.5)) * d2
    )


def step_order(sigmas: Tensor, i: int, order: int, num_history: int) -> int:
    """Order actually used at step i of the ``len(sigmas) - 1``-step schedule.

    min(order, num_history), with diffusers' ``lower_order_final``: the final step (to sigma = 0) is first
    order, and the penultimate step of a schedule shorter than 15 steps is at most second order. A history
    entry at sigma = 1 (lambda = -inf) has weight 0 in the multistep correction (r -> inf), so it is not
    counted: this is the exact limit and avoids the inf/inf of the third-order formula.
    """
    num_steps = len(sigmas) - 1
    if i == num_steps - 1:
        return 1
    earlier = range(max(i - num_history + 1, 0), i)
    usable = 1 + sum(bool(sigmas[j] < 1.0) for j in earlier)
    cap = 2 if (i == num_steps - 2 and num_steps < LOWER_ORDER_SECOND_BELOW_STEPS) else order
    return min(order, usable, cap)


def dpm_solver_step(
    x: Tensor,
    x0_history: Sequence[Tensor],
    sigmas: Tensor,
    i: int,
    order: int = 2,
    solver_type: SolverType = "midpoint",
) -> Tensor:
    """One DPM-Solver++ multistep step from ``sigmas[i]`` to ``sigmas[i+1]``.

    ``x0_history`` holds the data predictions x0 = x - sigma*v, newest last: ``x0_history[-1]`` at
    ``sigmas[i]``, ``x0_history[-2]`` at ``sigmas[i-1]``, ... (only the last ``order`` are used). The order
    is chosen by ``step_order``. Math in float32; the result has ``x``'s dtype.
    """
    if order not in SOLVER_ORDERS:
        raise ValueError(f"solver order must be one of {SOLVER_ORDERS}, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    if not 0 <= i < len(sigmas) - 1:
        raise ValueError(f"step index {i} is outside the {len(sigmas) - 1}-step schedule")
    if not 1 <= len(x0_history) <= i + 1:
        raise ValueError(
            f"x0_history must hold 1..{i + 1} data predictions (newest at sigmas[{i}]), got {len(x0_history)}"
        )
    used = step_order(sigmas, i, order, len(x0_history))
    m = [h.float() for h in x0_history[-used:]][::-1]  # m[0] at sigmas[i], m[1] at sigmas[i-1], ...
    s = [sigmas[i - k] for k in range(used)]
    sample = x.float()
    if used == 1:
        x_next = first_order_update(sample, m[0], s[0], sigmas[i + 1])
    elif used == 2:
        x_next = second_order_update(sample, m[0], m[1], s[1], s[0], sigmas[i + 1], solver_type)
    else:
        x_next = third_order_update(sample, m[0], m[1], m[2], s[2], s[1], s[0], sigmas[i + 1])
    return x_next.to(x.dtype)
