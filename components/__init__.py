"""KFP components of the MixGRPO pipeline: one module per step, thin wrappers over ``mixgrpo``.

Each component imports ``mixgrpo`` inside its function body (the function's source is what runs
in the container); the logic lives in :mod:`mixgrpo.pipeline_steps` and the modules it calls.
"""

from components.cache_rewards import cache_rewards
from components.evaluate import evaluate
from components.gate import gate
from components.hash_prompts import hash_prompts
from components.prepare_prompts import prepare_prompts
from components.promote import promote
from components.register import register
from components.train import train

__all__ = ["hash_prompts", "prepare_prompts", "cache_rewards", "train", "evaluate", "register", "gate", "promote"]
