"""The toy flow model: diffusers' ``FluxTransformer2DModel`` with a tiny config, in pixel space.

A 32x32 RGB image in [-1, 1] is cut into 4x4 patches and packed like FLUX packs its latents:
64 tokens of 48 channels (channel order: colour, patch row, patch column). The transformer
predicts the clean image x0; ``velocity`` converts it to the flow-matching velocity
``v = (x_t - x0) / max(sigma, 0.05)`` (x0-prediction learned shapes in minutes where direct
velocity prediction gave blobs). Text comes from a word-level tokenizer over the world's
vocabulary and an embedding table plus positions, built in code.

On disk (diffusers layout)::

    toy_model.json                  format tag, ToyModelConfig, vocabulary
    transformer/                    FluxTransformer2DModel.save_pretrained (safetensors)
    text_encoder/model.safetensors  the text encoder's weights
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from mixgrpo.models.base import Conditioning
from mixgrpo.toy.world import COLORS, IMAGE_SIZE, SHAPES

FORMAT = "mixgrpo-toy-model/1"
PATCH = 4
GRID = IMAGE_SIZE // PATCH  # 8x8 tokens
CHANNELS = 3 * PATCH * PATCH  # 48
MAX_TOKENS = 8
GUIDANCE = 3.5
MIN_SIGMA_DIVISOR = 0.05  # v = (x_t - x0) / max(sigma, 0.05)
PAD, OBJECT_ROLE, BACKGROUND_ROLE = 0, 1, 2


@dataclass(frozen=True)
class ToyModelConfig:
    """Sizes of the toy model. The default (0.61M parameters) runs a batch-32 forward in ~30-50 ms on a 2-core CPU."""

    num_layers: int = 2  # FLUX double-stream blocks
    num_single_layers: int = 4  # FLUX single-stream blocks
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    text_dim: int = 32  # width of encoder_hidden_states; the pooled vector is 2 * text_dim
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)  # sums to attention_head_dim

    def __post_init__(self) -> None:
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {self.axes_dims_rope} must be even numbers summing to "
                f"attention_head_dim={self.attention_head_dim}"
            )

    @classmethod
    def from_dict(cls, values: dict) -> ToyModelConfig:
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown ToyModelConfig keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**{**values, "axes_dims_rope": tuple(values.get("axes_dims_rope", cls.axes_dims_rope))})


def default_vocabulary() -> list[str]:
    """The world's words; index 0 is padding."""
    return ["<pad>", "a", "on", "background", *COLORS, *SHAPES]


@dataclass(frozen=True)
class TokenBatch:
    """Token ids (B, 8) and each token's role (0 pad, 1 object phrase, 2 background phrase)."""

    ids: torch.Tensor
    roles: torch.Tensor


class ToyTokenizer:
    """Word-level tokenizer: lower-cased words, padded to ``MAX_TOKENS``; unknown words are an error."""

    def __init__(self, vocabulary: list[str]):
        self.vocabulary = list(vocabulary)
        self.index = {word: i for i, word in enumerate(self.vocabulary)}

    def __call__(self, prompts: list[str]) -> TokenBatch:
        rows = [self._encode(prompt) for prompt in prompts]
        ids = torch.tensor([row[0] for row in rows], dtype=torch.long)
        roles = torch.tensor([row[1] for row in rows], dtype=torch.long)
        return TokenBatch(ids=ids, roles=roles)

    def _encode(self, prompt: str) -> tuple[list[int], list[int]]:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"words {unknown} of {prompt!r} are not in the toy vocabulary {self.vocabulary[1:]}")
        if len(words) > MAX_TOKENS:
            raise ValueError(f"{prompt!r} has {len(words)} words; the toy text encoder takes at most {MAX_TOKENS}")
        # Words up to "on" describe the object, the rest the background.
        split = words.index("on") if "on" in words else len(words)
        roles = [OBJECT_ROLE if i < split else BACKGROUND_ROLE for i in range(len(words))]
        pad = MAX_TOKENS - len(words)
        return [self.index[w] for w in words] + [PAD] * pad, roles + [PAD] * pad


class ToyTextEncoder(torch.nn.Module):
    """Embedding table plus learned positions -> (B, 8, D) states and a (B, 2D) role-aware pooled vector.

    The pooled vector concatenates the mean word embedding of the object phrase and that of the
    background phrase, so "a red circle on a blue background" and "a blue circle on a red
    background" pool differently (a plain mean would not).
    """

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab_size, dim)
        self.position_embedding = torch.nn.Parameter(torch.randn(MAX_TOKENS, dim) * 0.02)

    def forward(self, tokens: TokenBatch) -> Conditioning:
        words = self.token_embedding(tokens.ids)
        hidden = (words + self.position_embedding) * (tokens.roles != PAD).unsqueeze(-1)
        pooled = torch.cat([_masked_mean(words, tokens.roles == role) for role in (OBJECT_ROLE, BACKGROUND_ROLE)], -1)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(values.dtype)
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def build_transformer(config: ToyModelConfig) -> FluxTransformer2DModel:
    """A freshly initialised tiny FLUX transformer (pixel-space, 48 channels per token, guidance embedding on)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=CHANNELS,
        num_layers=config.num_layers,
        num_single_layers=config.num_single_layers,
        attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads,
        joint_attention_dim=config.text_dim,
        pooled_projection_dim=2 * config.text_dim,
        guidance_embeds=True,
        axes_dims_rope=config.axes_dims_rope,
    )


def pack(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 32, 32) -> (B, 64, 48), the way FLUX packs latents into patch tokens."""
    b = images.shape[0]
    patches = images.reshape(b, 3, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, GRID * GRID, CHANNELS)


def unpack(latents: torch.Tensor) -> torch.Tensor:
    """(B, 64, 48) -> (B, 3, 32, 32), the inverse of ``pack``."""
    b = latents.shape[0]
    patches = latents.reshape(b, GRID, GRID, 3, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, 3, IMAGE_SIZE, IMAGE_SIZE)


def image_ids() -> torch.Tensor:
    """FLUX's image position ids for the 8x8 token grid: (64, 3) with (0, row, column)."""
    ids = torch.zeros(GRID, GRID, 3)
    ids[..., 1] = torch.arange(GRID).view(-1, 1)
    ids[..., 2] = torch.arange(GRID).view(1, -1)
    return ids.reshape(GRID * GRID, 3)


def truncate_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep input: sigma truncated to a multiple of 1/1000 (spec section 2)."""
    return torch.trunc(sigma * 1000) / 1000


class ToyFlowModel:
    """``FlowModel`` adapter around the toy transformer and text encoder (latents in [-1, 1])."""

    def __init__(self, config: ToyModelConfig | None = None, vocabulary: list[str] | None = None):
        self.config = config or ToyModelConfig()
        self.tokenizer = ToyTokenizer(vocabulary or default_vocabulary())
        self.text_encoder = ToyTextEncoder(len(self.tokenizer.vocabulary), self.config.text_dim)
        self.module: FluxTransformer2DModel = build_transformer(self.config)

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def latent_shape(self) -> tuple[int, ...]:
        return (GRID * GRID, CHANNELS)

    def condition(self, prompts: list[str]) -> Conditioning:
        """Text conditioning with gradients to the text encoder (pre-training), on the transformer's device."""
        tokens = self.tokenizer(prompts)
        encoder_device = self.text_encoder.token_embedding.weight.device
        cond = self.text_encoder(TokenBatch(ids=tokens.ids.to(encoder_device), roles=tokens.roles.to(encoder_device)))
        return {key: value.to(self.device) for key, value in cond.items()}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Frozen text conditioning, as the trainer uses it."""
        with torch.no_grad():
            return self.condition(prompts)

    def predict_x0(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """The transformer's output: the predicted clean latents, same shape as ``latents``."""
        batch = latents.shape[0]
        sigma = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device).expand(batch)
        return self.module(
            hidden_states=latents,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            timestep=truncate_timestep(sigma),
            img_ids=image_ids().to(latents.device),
            txt_ids=torch.zeros(MAX_TOKENS, 3, device=latents.device),
            guidance=torch.full((batch,), GUIDANCE, dtype=latents.dtype, device=latents.device),
            return_dict=False,
        )[0]

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor | float, cond: Conditioning) -> torch.Tensor:
        """v = (x_t - x0) / max(sigma, 0.05), with x0 from ``predict_x0``."""
        x0 = self.predict_x0(latents, sigma, cond)
        sigma = torch.as_tensor(sigma, dtype=latents.dtype, device=latents.device)
        divisor = sigma.clamp(min=MIN_SIGMA_DIVISOR).reshape(-1, *[1] * (latents.dim() - 1))
        return (latents - x0) / divisor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 64, 48) latents in [-1, 1] -> images (B, 3, 32, 32) in [0, 1]."""
        return ((unpack(latents) + 1) / 2).clamp(0.0, 1.0)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, 32, 32) in [0, 1] -> latents (B, 64, 48) in [-1, 1] (pre-training data)."""
        return pack(images * 2 - 1)

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        return self.module.parameters()

    def to(self, device: torch.device | str) -> ToyFlowModel:
        self.module.to(device)
        self.text_encoder.to(device)
        return self


def save_toy_model(model: ToyFlowModel, directory: str | Path) -> Path:
    """Write the model in diffusers layout (see the module docstring); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.module.save_pretrained(directory / "transformer", safe_serialization=True)
    (directory / "text_encoder").mkdir(exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.text_encoder.state_dict().items()}
    save_file(state, str(directory / "text_encoder" / "model.safetensors"))
    meta = {"format": FORMAT, "config": asdict(model.config), "vocabulary": model.tokenizer.vocabulary}
    (directory / "toy_model.json").write_text(json.dumps(meta, indent=2))
    return directory


def load_toy_model(directory: str | Path) -> ToyFlowModel:
    """Read a model written by ``save_toy_model``."""
    directory = Path(directory)
    meta_path = directory / "toy_model.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} is not a toy model written by save_toy_model")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; re-save the model")
    model = ToyFlowModel(ToyModelConfig.from_dict(meta["config"]), meta["vocabulary"])
    model.module = FluxTransformer2DModel.from_pretrained(directory / "transformer")
    model.text_encoder.load_state_dict(load_file(str(directory / "text_encoder" / "model.safetensors")))
    return model
