"""MixGRPO: GRPO alignment of flow-matching text-to-image transformers with a sliding
window of SDE steps inside an otherwise ODE sampler (arXiv 2507.21802).

The algorithm core (``mixgrpo.sampling``, ``mixgrpo.window``, ``mixgrpo.grpo``) imports torch
only; models, rewards, storage and the registry live in their own modules.
"""

__version__ = "0.1.0"
