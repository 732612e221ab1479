"""An analytic flow-matching velocity field shared by the sampling tests.

For data x0 ~ N(m, c^2 I) and x_sigma = (1 - sigma)*x0 + sigma*eps, the marginal is
N((1 - sigma)*m, ((1 - sigma)^2 c^2 + sigma^2) I) and the exact velocity is v = E[eps | x] - E[x0 | x].
Its probability-flow ODE maps the noise z (at sigma = 1) to m + c*z (at sigma = 0).
"""

from __future__ import annotations

import torch


def gaussian_velocity(x: torch.Tensor, sigma: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """v = E[eps|x] - E[x0|x] for data N(mean, scale^2 I); ``mean`` broadcasts against ``x``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    alpha = 1.0 - sigma
    variance = alpha**2 * scale**2 + sigma**2
    residual = x.float() - alpha * mean
    x0 = mean + alpha * scale**2 / variance * residual
    eps = sigma / variance * residual
    return (eps - x0).to(x.dtype)


def gaussian_flow_endpoint(noise: torch.Tensor, mean: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact ODE solution at sigma = 0 started from ``noise`` at sigma = 1."""
    return mean + scale * noise
