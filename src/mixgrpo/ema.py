"""An exponential moving average of the trained weights (``optim.ema_decay``; Flow-GRPO evaluates such an EMA).

After every iteration's update ``ema <- d * ema + (1 - d) * theta`` for every trainable parameter. The
rollouts use the live weights ``theta``; the held-out and validation evaluations, the best-checkpoint
selection and the final weights use the average, which smooths the step-to-step noise of small groups.
Replicated weights only (one process or DDP): each rank keeps the same average of the same weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


class WeightEMA:
    """The average of ``module``'s trainable parameters, keyed by parameter name (detached copies)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in (0, 1)")
        self.decay = decay
        self.restart(module)

    def restart(self, module: torch.nn.Module) -> None:
        """Start the average at the module's current weights."""
        self.shadow = {name: p.detach().clone() for name, p in _trained(module)}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """``ema <- d * ema + (1 - d) * theta``."""
        for name, p in _trained(module):
            self.shadow[name].lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        """Overwrite the module's trainable parameters with the average (for good: the final weights)."""
        for name, p in _trained(module):
            p.copy_(self.shadow[name])

    @contextmanager
    def applied(self, module: torch.nn.Module) -> Iterator[None]:
        """The average in the module for the ``with`` block (an evaluation), the live weights again after it."""
        live = {name: p.detach().clone() for name, p in _trained(module)}
        self.copy_to(module)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in _trained(module):
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore a checkpoint's average; its names must be this module's trainable parameters."""
        if set(state) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(state)), sorted(set(state) - set(self.shadow))
            raise ValueError(f"EMA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, value in state.items():
            self.shadow[name].copy_(value)


def _trained(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, p) for name, p in module.named_parameters() if p.requires_grad)


@contextmanager
def maybe_applied(ema: WeightEMA | None, module: torch.nn.Module) -> Iterator[None]:
    """``ema.applied(module)``, or nothing without an EMA."""
    if ema is None:
        yield
    else:
        with ema.applied(module):
            yield
