"""KFP components of the MixGRPO pipeline: one module per step, thin wrappers over ``mixgrpo``.

Installed as ``mixgrpo_pipelines.components`` (pyproject's package-dir).

Each component imports ``mixgrpo`` inside its function body (the function's source is what runs
in the container); the logic lives in :mod:`mixgrpo_pipelines.pipelines.steps` and the modules it calls.
"""

from mixgrpo_pipelines.components.cache_rewards import cache_rewards
from mixgrpo_pipelines.components.evaluate import evaluate
from mixgrpo_pipelines.components.gate import gate
from mixgrpo_pipelines.components.hash_prompts import hash_prompts
from mixgrpo_pipelines.components.prepare_prompts import prepare_prompts
from mixgrpo_pipelines.components.promote import promote
from mixgrpo_pipelines.components.register import register
from mixgrpo_pipelines.components.train import train

__all__ = ["hash_prompts", "prepare_prompts", "cache_rewards", "train", "evaluate", "register", "gate", "promote"]
