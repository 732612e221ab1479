"""Flow-model adapters: one small interface (``FlowModel``) over FLUX and the toy model."""

from mixgrpo.models.base import Conditioning, FlowModel, index_conditioning, repeat_conditioning

__all__ = ["Conditioning", "FlowModel", "index_conditioning", "repeat_conditioning"]
