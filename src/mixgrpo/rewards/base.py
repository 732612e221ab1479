"""The reward interface and registry.

A reward scores images for prompts: ``reward(images, prompts) -> Tensor[B]`` with images in
[0, 1] of shape (B, 3, H, W). A sample the reward could not score is ``NaN`` (never a silent 0):
``mixgrpo.grpo.group_advantages`` masks it out or fails, by configuration.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch


@runtime_checkable
class Reward(Protocol):
    name: str

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register_reward(name: str) -> Callable[[Callable[..., Reward]], Callable[..., Reward]]:
    """Decorator: register a reward factory under ``name``."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"reward name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def _import_builtin_rewards() -> None:
    # Importing these modules registers their rewards; each import is cheap (weights load lazily).
    import importlib

    modules = (
        "mixgrpo.toy.rewards",
        "mixgrpo.rewards.clip_scorers",
        "mixgrpo.rewards.imagereward",
        "mixgrpo.rewards.unified",
    )
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:  # pragma: no cover - only while a module is being built
            if error.name != module:
                raise


def available_rewards() -> list[str]:
    _import_builtin_rewards()
    return sorted(_REGISTRY)


def build_reward(name: str, **kwargs) -> Reward:
    """Build the reward registered as ``name``; an unknown name lists the known ones."""
    _import_builtin_rewards()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(_REGISTRY)) or '(none)'}")
    return _REGISTRY[name](**kwargs)
