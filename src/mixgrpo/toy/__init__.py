"""The built-in toy world: a tiny FLUX-class text-to-image flow model MixGRPO can align on a CPU.

- ``mixgrpo.toy.world``: prompts "a <colour> <shape> on a <colour> background", the held-out
  split, and a renderer of 32x32 images (pre-training data).
- ``mixgrpo.toy.model``: ``ToyFlowModel`` (diffusers ``FluxTransformer2DModel``, tiny config,
  pixel space, x0-prediction) with ``save_toy_model`` / ``load_toy_model``.
- ``mixgrpo.toy.rewards``: ``toy_object_color``, ``toy_background``, ``toy_shape``,
  ``toy_contrast`` and the never-trained ``toy_heldout_realism``.
- ``mixgrpo.toy.pretrain``: ``pretrain_base_model`` and ``ensure_base_model`` (cached).

Submodules are imported explicitly (``from mixgrpo.toy.model import ...``) so that the reward
registry can load the toy rewards without importing diffusers.
"""
