"""What a run trains and scores: the policy adapter, the rewards, the frozen reference policy of the KL term."""

from __future__ import annotations

import copy

import torch

from mixgrpo.config import TrainConfig
from mixgrpo.models.base import FlowModel
from mixgrpo.rewards.base import Reward, build_reward


def build_policy(cfg: TrainConfig, device: torch.device) -> FlowModel:
    """The policy adapter named by ``cfg.model`` (toy: the cached built-in base)."""
    if cfg.model.kind == "toy":
        from mixgrpo.toy.model import load_toy_model
        from mixgrpo.toy.pretrain import ensure_base_model

        path = cfg.model.path or str(ensure_base_model())
        policy = load_toy_model(path)
    elif cfg.model.kind == "flux":
        from mixgrpo.models.flux import build_flux_policy

        policy = build_flux_policy(cfg.model, device)
    else:
        raise NotImplementedError(f"model.kind={cfg.model.kind!r} is not available; use model.kind=toy or flux")
    policy.module.to(device)
    if cfg.model.gradient_checkpointing and hasattr(policy.module, "enable_gradient_checkpointing"):
        policy.module.enable_gradient_checkpointing()
    return policy

def build_rewards(cfg: TrainConfig, names: list[str], device: torch.device) -> dict[str, Reward]:
    """The registered rewards ``names``, each with its ``rewards.options`` keyword arguments."""
    return {name: build_reward(name, **cfg.rewards.options.get(name, {})) for name in names}

def build_reference(policy: FlowModel) -> FlowModel:
    """A frozen copy of the policy at its current (base) weights, for the KL-to-reference term."""
    reference = copy.copy(policy)
    reference.module = copy.deepcopy(policy.module).requires_grad_(False).eval()
    return reference
