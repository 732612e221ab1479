"""The flow-model adapter interface the trainer, the sampler CLI and the evaluator use.

A policy is anything that can
  - encode prompts into a conditioning (a dict of tensors, batch dimension first),
  - predict the flow-matching velocity ``v = eps - x0`` for latents at noise level ``sigma``,
  - decode final latents to images in [0, 1] of shape (B, 3, H, W),
  - name its trainable parameters and its ``torch.nn.Module``.

Latents may have any shape ``(B, ...)``; the step rules in ``mixgrpo.sampling`` average their
log-probabilities over every non-batch element.
"""

from __future__ import annotations

from typing import Iterable, Protocol, runtime_checkable

import torch

Conditioning = dict[str, torch.Tensor]


def index_conditioning(cond: Conditioning, index: torch.Tensor | slice) -> Conditioning:
    """Select rows of every tensor of a conditioning (batch dimension first)."""
    return {key: value[index] for key, value in cond.items()}


def repeat_conditioning(cond: Conditioning, repeats: int) -> Conditioning:
    """Repeat every row ``repeats`` times, group-major: row g becomes rows g*repeats ... g*repeats+repeats-1."""
    return {key: value.repeat_interleave(repeats, dim=0) for key, value in cond.items()}


@runtime_checkable
class FlowModel(Protocol):
    """What a policy adapter offers. ``module`` is the trained ``torch.nn.Module`` (the DiT)."""

    module: torch.nn.Module

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dimension."""
        ...

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> conditioning tensors (batch dimension first)."""
        ...

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """Predicted velocity at noise level ``sigma`` (a scalar or one value per row)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> images in [0, 1], shape (B, 3, H, W)."""
        ...

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters the optimiser updates (all of the DiT, or its LoRA weights)."""
        ...
