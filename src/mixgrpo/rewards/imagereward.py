"""ImageReward (THUDM): BLIP ViT-L image encoder + a BERT text encoder cross-attending to it.

``r = MLP(h_cls)`` with ``h_cls`` the text encoder's [CLS] state (text: BERT-base uncased, padded /
cut to 35 tokens; every layer: self-attention, cross-attention to all image tokens, feed-forward)
and the MLP ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (linear layers, no activations, as published).
Reported score: ``(r - 0.16717) / 1.03334`` (``normalize="standard"``); ``"raw"`` gives ``r``.
Image: as ImageReward's torchvision transform on the 8-bit PIL image: shortest side to 224 (PIL
bicubic), ``CenterCrop(224)`` (offset ``round(excess / 2)``), CLIP mean / std (see
:mod:`mixgrpo.rewards.preprocess`; ``resample="torch"`` selects the approximate on-device resize).

The architecture is built here so that the published ``ImageReward.pt`` loads with its own key
names, strictly:

* ``blip.visual_encoder.*``: :class:`BlipViT`, BLIP's timm-style ViT (``patch_embed.proj``,
  ``cls_token``, ``pos_embed``, ``blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2``,
  ``norm``; LayerNorm eps 1e-6). Its size comes from the checkpoint's shapes; heads = width / 64.
* ``blip.text_encoder.*``: transformers' ``BlipTextModel``, a port of BLIP's ``med.py`` with the
  same key names. (``BertModel`` with ``add_cross_attention`` cannot be used: its cross-attention
  keys / values read ``hidden_size`` (768) features, BLIP's read the ViT's width (1024).) Built
  with ``is_decoder=True`` so that every layer has cross-attention, and called with
  ``is_decoder=False`` (bidirectional self-attention): BLIP's "multimodal" mode, which ImageReward uses.
* ``mlp.layers.{0,2,4,6,7}``: the reward head.

The checkpoint also holds ``blip.vision_proj``, ``blip.text_proj`` (unused for scoring) and the
``position_ids`` buffer (checked to be ``0..n-1``); those are the only keys dropped.
Files (``weights_dir``): ``ImageReward.pt``, ``med_config.json``, BERT ``vocab.txt`` (bert-base-uncased).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mixgrpo.rewards.base import register_reward
from mixgrpo.rewards.cache import check_weights_dir, resolve_weights_dir
from mixgrpo.rewards.clip_scorers import resolve_dtype, materialise_position_ids, load_torch_state_dict
from mixgrpo.rewards.preprocess import ImageTransform, Resampler, score_in_batches

CHECKPOINT = "ImageReward.pt"
MED_CONFIG = "med_config.json"
MAX_TEXT_TOKENS = 35
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
HEAD_SIZES = (1024, 128, 64, 16, 1)
_UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
_POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


# --------------------------------------------------------------------------- the image tower


@dataclass(frozen=True)
class BlipViTConfig:
    """BLIP's ViT; ImageReward uses ViT-L/16 at 224 (the defaults)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], prefix: str, head_dim: int = 64) -> BlipViTConfig:
        """Sizes read off a checkpoint's tensor shapes; heads = width / ``head_dim`` (ViT-B and ViT-L: 64)."""
        proj = state[f"{prefix}patch_embed.proj.weight"]  # [width, 3, p, p]
        width, patch = proj.shape[0], proj.shape[-1]
        grid = round((state[f"{prefix}pos_embed"].shape[1] - 1) ** 0.5)
        block = re.compile(rf"{re.escape(prefix)}blocks\.(\d+)\.")
        depth = len({m.group(1) for k in state if (m := block.match(k))})
        hidden = state[f"{prefix}blocks.0.mlp.fc1.weight"].shape[0]
        if width % head_dim:
            raise ValueError(f"ViT width {width} is not a multiple of the head size {head_dim}")
        return cls(grid * patch, patch, width, depth, width // head_dim, hidden)


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: BlipViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d_head)) v
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, cfg: BlipViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = _Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = _Mlp(cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BlipViT(nn.Module):
    """``(B, 3, S, S)`` -> all token states ``(B, 1 + (S/p)^2, width)`` after the final LayerNorm."""

    def __init__(self, cfg: BlipViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch_size
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, cfg.width))
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------- the whole model


class RewardHead(nn.Module):
    """ImageReward's MLP: linear layers ``in -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts at 1, 3, 5)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        a, b, c, d, e = HEAD_SIZES
        self.layers = nn.Sequential(
            nn.Linear(width, a), nn.Dropout(0.2), nn.Linear(a, b), nn.Dropout(0.2),
            nn.Linear(b, c), nn.Dropout(0.1), nn.Linear(c, d), nn.Linear(d, e),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """``blip.visual_encoder`` + ``blip.text_encoder`` + ``mlp``: ``forward`` gives the raw reward ``r`` [B]."""

    def __init__(self, vit: BlipViTConfig, text_config: Any) -> None:
        from transformers import BlipTextModel

        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = BlipViT(vit)
        self.blip.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = RewardHead(text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_states = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_states,
            is_decoder=False, return_dict=True,
        )
        return self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1)


def text_config_from_med(path: str | Path, encoder_width: int) -> Any:
    """A ``BlipTextConfig`` from BLIP's ``med_config.json``; cross-attention reads ``encoder_width`` features."""
    from transformers import BlipTextConfig

    path = Path(path)
    try:
        med = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}; it is the BERT config published beside ImageReward.pt") from error
    if not med.get("add_cross_attention", False):
        raise ValueError(f"{path}: add_cross_attention is not true; ImageReward's text encoder cross-attends to the image")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {med['position_embedding_type']!r} is not supported (only 'absolute')")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "pad_token_id")
    missing = [k for k in keys[:6] if k not in med]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; use the med_config.json published with ImageReward")
    fields = {k: med[k] for k in keys if k in med}
    return BlipTextConfig(
        **fields, encoder_hidden_size=encoder_width, is_decoder=True,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


def load_image_reward(directory: str | Path) -> ImageRewardModel:
    """The model with ``ImageReward.pt``'s weights, loaded strictly (see the module doc for dropped keys)."""
    root = Path(directory)
    state = load_torch_state_dict(root / CHECKPOINT)
    position_ids = state.pop(_POSITION_IDS, None)
    if position_ids is not None and not torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())):
        raise ValueError(f"{root / CHECKPOINT}: {_POSITION_IDS} is not 0..n-1; this is not an ImageReward checkpoint")
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_PREFIXES)}
    try:
        vit = BlipViTConfig.from_state_dict(state, "blip.visual_encoder.")
    except KeyError as error:
        raise ValueError(f"{root / CHECKPOINT} has no {error.args[0]}; expected ImageReward's BLIP checkpoint") from error
    with torch.device("meta"):
        model = ImageRewardModel(vit, text_config_from_med(root / MED_CONFIG, vit.width))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{root / CHECKPOINT} does not match {root / MED_CONFIG} and ViT {vit}: {error}") from error
    materialise_position_ids(model)
    return model.eval()


def load_blip_tokenizer(directory: str | Path) -> Any:
    """BERT-base uncased tokenizer plus BLIP's ``[DEC]`` (bos) and ``[ENC]`` tokens (vocab 30522 -> 30524)."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(directory), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


# --------------------------------------------------------------------------- the reward


class ImageRewardScorer:
    """``(images, prompts) -> Tensor[B]``: ``(r - mean) / std`` (or ``r``), batched on ``device``; NaN rows for bad pixels."""

    name = "imagereward"

    def __init__(
        self,
        model: ImageRewardModel,
        tokenizer: Any,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        dtype: str = "float32",
        normalize: Literal["standard", "raw"] = "standard",
        resample: Resampler = "pil",
    ) -> None:
        if normalize not in ("standard", "raw"):
            raise ValueError(f"imagereward: normalize must be 'standard' or 'raw', got {normalize!r}")
        if batch_size < 1:
            raise ValueError(f"imagereward: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.name)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.normalize = normalize
        self.transform = ImageTransform(
            size=model.blip.visual_encoder.cfg.image_size, mode="crop", crop="round", resample=resample,
        )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raw = score_in_batches(images, prompts, self.name, self.batch_size, self._raw)
        scores = (raw - REWARD_MEAN) / REWARD_STD if self.normalize == "standard" else raw
        return scores.to(images.device)

    def _raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS, return_tensors="pt")
        r = self.model(pixels, tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return r.float().cpu()


@register_reward("imagereward")
def build_imagereward(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: str = "float32",
    normalize: Literal["standard", "raw"] = "standard",
    cache_dir: str | Path | None = None,
    resample: Resampler = "pil",
) -> ImageRewardScorer:
    """ImageReward from ``weights_dir`` (local dir or s3:// / file:// URI of cached weights)."""
    root = check_weights_dir("imagereward", resolve_weights_dir(weights_dir, cache_dir=cache_dir))
    return ImageRewardScorer(
        load_image_reward(root), load_blip_tokenizer(root),
        device=device, batch_size=batch_size, dtype=dtype, normalize=normalize, resample=resample,
    )
