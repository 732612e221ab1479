"""A FLUX.1-dev-shaped policy with random weights, for measuring speed and memory without a download.

The transformer is a diffusers ``FluxTransformer2DModel`` with FLUX.1-dev's configuration
(``FLUX_DEV_ARCHITECTURE``: 19 double + 38 single blocks, 24 heads x 128 = 3072 hidden,
joint_attention_dim 4096, pooled 768, guidance embedding, 64 packed input channels, rope axes
(16, 56, 56)); ``FluxShape`` scales its depth (and, for tests, its width). The frozen parts are
replaced by random tensors of their real shapes, so the cost of a step is the transformer's alone:

- text encoders: per prompt, T5 states (text_tokens x joint_attention_dim, 512 x 4096) and a pooled
  CLIP vector (768), drawn from a generator seeded by the prompt's sha256;
- VAE: ``decode`` unpacks the latent (16 channels at H/8 x W/8), takes its first 3 channels through a
  sigmoid and repeats each pixel 8x8: an image of the right size in [0, 1], nothing learned.

The transformer forward is ``FluxFlowModel.velocity`` itself (timestep truncation, guidance 3.5,
position ids), and LoRA is ``FluxFlowModel.add_lora`` (same target modules, float32 LoRA weights).
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Iterator

import torch

from mixgrpo.models.base import Conditioning
from mixgrpo.models.flux import FluxFlowModel, FluxSettings, latent_grid, latent_image_ids, unpack_latents

FLUX_DEV_ARCHITECTURE = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""black-forest-labs/FLUX.1-dev transformer/config.json (the keys that decide shapes and cost)."""
FLUX_DEV_TEXT_TOKENS = 512  # T5 max_sequence_length in training
VAE_SCALE_FACTOR = 8


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Even rope axes summing to ``head_dim``, FLUX's proportions: 128 -> (16, 56, 56), 16 -> (4, 6, 6)."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"attention head dim {head_dim} must be even and >= 6 (three even rope axes)")
    side = 2 * ((head_dim - head_dim // 8) // 4)
    return head_dim - 2 * side, side, side


@dataclass(frozen=True)
class FluxShape:
    """Which FLUX to build: FLUX.1-dev's widths by default, ``double`` + ``single`` blocks, ``resolution`` px.

    720 px -> 90x90 latents -> 2025 image tokens of 64 channels; 64 px -> 16 tokens.
    """

    double: int = FLUX_DEV_ARCHITECTURE["num_layers"]
    single: int = FLUX_DEV_ARCHITECTURE["num_single_layers"]
    resolution: int = 720
    heads: int = FLUX_DEV_ARCHITECTURE["num_attention_heads"]
    head_dim: int = FLUX_DEV_ARCHITECTURE["attention_head_dim"]
    text_dim: int = FLUX_DEV_ARCHITECTURE["joint_attention_dim"]
    pooled_dim: int = FLUX_DEV_ARCHITECTURE["pooled_projection_dim"]
    text_tokens: int = FLUX_DEV_TEXT_TOKENS

    def __post_init__(self) -> None:
        if self.double < 0 or self.single < 0 or self.double + self.single == 0:
            raise ValueError(f"blocks {self.double},{self.single}: need >= 0 of each and at least one block")
        if self.resolution <= 0 or self.resolution % 16:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of 16 (8x VAE x 2x2 packing)")
        if min(self.heads, self.text_dim, self.pooled_dim, self.text_tokens) < 1:
            raise ValueError("heads, text_dim, pooled_dim and text_tokens must be >= 1")
        rope_axes(self.head_dim)

    def architecture(self) -> dict:
        """``FluxTransformer2DModel`` keyword arguments."""
        return {**FLUX_DEV_ARCHITECTURE, "num_layers": self.double, "num_single_layers": self.single,
                "attention_head_dim": self.head_dim, "num_attention_heads": self.heads,
                "joint_attention_dim": self.text_dim, "pooled_projection_dim": self.pooled_dim,
                "axes_dims_rope": rope_axes(self.head_dim)}

    @property
    def image_tokens(self) -> int:
        h, w = latent_grid(FluxSettings(height=self.resolution, width=self.resolution), VAE_SCALE_FACTOR)
        return (h // 2) * (w // 2)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in ``dtype`` (no float32 copy of 12B weights first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class RandomFluxPolicy(FluxFlowModel):
    """``FluxFlowModel`` over a random FLUX-shaped transformer; text encoders and VAE are random stand-ins."""

    def __init__(self, transformer: torch.nn.Module, shape: FluxShape, settings: FluxSettings):
        # FluxFlowModel.__init__ reads a model directory (encoders, VAE); here only what velocity,
        # add_lora and trainable_parameters use is set.
        self.module = transformer
        self.shape = shape
        self.settings = settings
        self.grid = latent_grid(settings, VAE_SCALE_FACTOR)
        self._img_ids = latent_image_ids(*self.grid)
        self._memory: dict[str, Conditioning] = {}

    def latent_shape(self) -> tuple[int, ...]:
        return (self.shape.image_tokens, FLUX_DEV_ARCHITECTURE["in_channels"])

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Random T5 states (text_tokens, text_dim) and pooled vector (pooled_dim) per prompt, fixed by its sha256."""
        for prompt in dict.fromkeys(prompts):
            if prompt not in self._memory:
                seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") & ((1 << 63) - 1)
                g = torch.Generator().manual_seed(seed)
                self._memory[prompt] = {
                    "encoder_hidden_states": torch.randn(1, self.shape.text_tokens, self.shape.text_dim, generator=g),
                    "pooled_projections": torch.randn(1, self.shape.pooled_dim, generator=g)}
        return {key: torch.cat([self._memory[p][key] for p in prompts]).to(self.device)
                for key in ("encoder_hidden_states", "pooled_projections")}

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """sigmoid of the first 3 latent channels, each pixel repeated 8x8: (B, 3, H, W) in [0, 1]."""
        z = unpack_latents(latents.float(), *self.grid)[:, :3]
        return torch.sigmoid(z).repeat_interleave(VAE_SCALE_FACTOR, 2).repeat_interleave(VAE_SCALE_FACTOR, 3)


def build_random_flux_policy(shape: FluxShape, device: torch.device, *, weights_dtype: torch.dtype = torch.float32,
                             lora_rank: int = 0, gradient_checkpointing: bool = False, seed: int = 0) -> RandomFluxPolicy:
    """Random-weight FLUX-shaped policy on ``device``, built there in ``weights_dtype`` (LoRA weights float32)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    with default_dtype(weights_dtype), torch.device(device):
        transformer = FluxTransformer2DModel(**shape.architecture())
    settings = FluxSettings(height=shape.resolution, width=shape.resolution, lora_rank=lora_rank,
                            gradient_checkpointing=gradient_checkpointing,
                            transformer_dtype="bfloat16" if weights_dtype == torch.bfloat16 else "float32")
    policy = RandomFluxPolicy(transformer, shape, settings)
    if lora_rank > 0:
        policy.add_lora()
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return policy
