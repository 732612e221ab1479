"""CLIP-family rewards: HPS v2.1, PickScore and CLIP score, all on transformers' ``CLIPModel``.

Each scores an image against its prompt from the two towers' embeddings ``i`` and ``t``:

* ``hps``: HPS v2.1 (open_clip ViT-H-14 fine-tuned on HPDv2). ``cos(i, t)``, no logit scale (~0.3).
  Image: longest side to 224 (bicubic), padded to a square with black, CLIP mean / std.
* ``pickscore``: PickScore_v1 (CLIP-H). ``s = exp(logit_scale) * cos(i, t)`` (about 18-24), text
  cut at 77 tokens. ``normalize="train"`` gives ``(s - 18) / 8`` (what MixGRPO trains on),
  ``"report"`` ``s / 100`` (the paper's tables), ``"raw"`` ``s``.
* ``clip``: DFN5B-CLIP-ViT-H-14-384. ``cos(i, t)``.

Prompts: HPS and the CLIP score are open_clip models, whose tokenizer cleans a prompt before BPE
(:func:`open_clip_clean`: ``ftfy.fix_text``, ``html.unescape`` twice, whitespace runs to one
space, lower case); PickScore's reference is transformers' ``CLIPProcessor``, whose (fast)
tokenizer only applies NFC, the whitespace rule and lower case, so its prompts are not cleaned.
Text is cut at the model's context (77): start token, the first 75 BPE tokens, end token, as both
tokenizers do. Images: see :mod:`mixgrpo.rewards.preprocess` (8-bit, PIL bicubic, per-reference
crop / pad arithmetic); ``resample="torch"`` selects the approximate on-device resize.

Why HPS runs on ``CLIPModel`` and not open_clip: ``open_clip`` imports torchvision, which has no
CPU build for this project's torch, so it cannot be installed on the CPU images (and pins its own
torch on the GPU ones). The HPS checkpoint is an open_clip state dict; :func:`convert_open_clip_state_dict`
renames (and splits / transposes) its tensors into ``CLIPModel``'s at load time, so the cached
file stays byte-identical to the published one (its sha256 can be checked against upstream).
The two models compute the same function: pre-LayerNorm transformer blocks, a causal text tower
pooled at the end-of-text token, a class-token vision tower, linear projections without bias.

Mapping (open_clip -> CLIPModel; ``{i}`` a block index, ``T`` a transpose):

====================================================  ==============================================
``token_embedding.weight``                            ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                              ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.{i}.ln_1 / ln_2``             ``text_model.encoder.layers.{i}.layer_norm1 / 2``
``...attn.in_proj_weight / _bias`` (q; k; v stacked)  ``...self_attn.q_proj / k_proj / v_proj``
``...attn.out_proj``                                  ``...self_attn.out_proj``
``...mlp.c_fc / c_proj``                              ``...mlp.fc1 / fc2``
``ln_final``                                          ``text_model.final_layer_norm``
``text_projection`` (width x embed)                   ``text_projection.weight`` (T)
``visual.conv1.weight``                               ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                            ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                       ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre / ln_post``                           ``vision_model.pre_layrnorm / post_layernorm``
``visual.transformer.resblocks.{i}...``               ``vision_model.encoder.layers.{i}...`` (as text)
``visual.proj`` (width x embed)                       ``visual_projection.weight`` (T)
``logit_scale``                                       ``logit_scale``
====================================================  ==============================================
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from mixgrpo.rewards.base import register_reward
from mixgrpo.rewards.cache import check_weights_dir, resolve_weights_dir
from mixgrpo.rewards.preprocess import ImageTransform, Resampler, score_in_batches, transform_from_processor_config

HPS_CHECKPOINT = "HPS_v2.1_compressed.pt"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"
PICKSCORE_SHIFT, PICKSCORE_SCALE = 18.0, 8.0  # training normalisation (s - 18) / 8
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --------------------------------------------------------------------------- open_clip -> CLIPModel


@dataclass(frozen=True)
class OpenClipArch:
    """An open_clip ViT CLIP's shape (the fields of its ``model_cfg``)."""

    embed_dim: int
    vision_width: int
    vision_layers: int
    vision_head_width: int  # heads = width / head_width
    patch_size: int
    image_size: int
    context_length: int
    vocab_size: int
    text_width: int
    text_heads: int
    text_layers: int
    mlp_ratio: float = 4.0
    quick_gelu: bool = False  # x * sigmoid(1.702 x) instead of exact GELU (OpenAI / DFN weights)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> OpenClipArch:
        """From an ``open_clip_config.json`` document (``{"model_cfg": ...}``) or a bare model config."""
        model = cfg.get("model_cfg", cfg)
        vision, text = model["vision_cfg"], model["text_cfg"]
        image_size = vision.get("image_size", 224)
        return cls(
            embed_dim=int(model["embed_dim"]),
            vision_width=int(vision.get("width", 768)),
            vision_layers=int(vision.get("layers", 12)),
            vision_head_width=int(vision.get("head_width", 64)),
            patch_size=int(vision.get("patch_size", 16)),
            image_size=int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size),
            context_length=int(text.get("context_length", 77)),
            vocab_size=int(text.get("vocab_size", 49408)),
            text_width=int(text.get("width", 512)),
            text_heads=int(text.get("heads", 8)),
            text_layers=int(text.get("layers", 12)),
            mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            quick_gelu=bool(model.get("quick_gelu", False)),
        )

    def hf_config(self, *, bos_token_id: int, eos_token_id: int, pad_token_id: int) -> Any:
        """The equivalent ``transformers.CLIPConfig`` (token ids from the tokenizer)."""
        from transformers import CLIPConfig

        if self.vision_width % self.vision_head_width:
            raise ValueError(f"vision width {self.vision_width} is not a multiple of head_width {self.vision_head_width}")
        act = "quick_gelu" if self.quick_gelu else "gelu"
        text = dict(
            vocab_size=self.vocab_size, hidden_size=self.text_width, intermediate_size=int(self.text_width * 4.0),
            num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
            max_position_embeddings=self.context_length, hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=self.embed_dim, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )
        vision = dict(
            hidden_size=self.vision_width, intermediate_size=int(self.vision_width * self.mlp_ratio),
            num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_width // self.vision_head_width,
            image_size=self.image_size, patch_size=self.patch_size, hidden_act=act, layer_norm_eps=1e-5,
            projection_dim=self.embed_dim,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim)


# open_clip ViT-H-14 (HPSv2's model_configs/ViT-H-14.json): the architecture HPS v2.1 fine-tunes.
VIT_H_14 = OpenClipArch(
    embed_dim=1024, vision_width=1280, vision_layers=32, vision_head_width=80, patch_size=14, image_size=224,
    context_length=77, vocab_size=49408, text_width=1024, text_heads=16, text_layers=24,
)

_BLOCK = re.compile(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)")
_BLOCK_PARTS = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_LEVEL = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"text_projection": "text_projection.weight", "visual.proj": "visual_projection.weight"}


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an open_clip ViT CLIP state dict into ``CLIPModel``'s keys (table in the module doc).

    ``in_proj_weight`` ``[3d, d]`` is split into q, k, v ``[d, d]`` (rows in that order);
    projections stored ``x @ P`` become ``nn.Linear`` weights ``P^T``. Any key it does not know
    is an error (so a checkpoint of another architecture cannot load half-way).
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif match := _BLOCK.fullmatch(key):
            tower = "vision_model" if match.group(1) else "text_model"
            prefix, part = f"{tower}.encoder.layers.{match.group(2)}.", match.group(3)
            if part in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = part.rsplit("_", 1)[-1]  # weight / bias
                for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}.{kind}"] = chunk.contiguous()
            elif part in _BLOCK_PARTS:
                out[prefix + _BLOCK_PARTS[part]] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"open_clip state dict has keys this converter does not know: {sorted(unknown)[:8]}"
            f"{' ...' if len(unknown) > 8 else ''}; only ViT CLIPs without layer scale / attentional pooling are supported"
        )
    return out


def load_torch_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: a bare state dict or ``{"state_dict": ...}``, ``module.`` prefixes removed."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - name the file and the fix
        raise ValueError(f"cannot read checkpoint {path}: {error}; re-cache the reward's weights") from error
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} is not a state dict of tensors (got {type(obj).__name__}); expected the published checkpoint")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_open_clip_as_hf(checkpoint: str | Path, arch: OpenClipArch, tokenizer: Any) -> Any:
    """A ``CLIPModel`` holding an open_clip checkpoint's weights (strict: every tensor used, none missing)."""
    from transformers import CLIPModel

    config = arch.hf_config(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    converted = convert_open_clip_state_dict(load_torch_state_dict(checkpoint))
    with torch.device("meta"):
        model = CLIPModel(config)
    try:
        model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(
            f"{checkpoint} does not match the architecture {arch}: {error}. Put the model's "
            f"{OPEN_CLIP_CONFIG} beside the checkpoint"
        ) from error
    materialise_position_ids(model)
    return model.eval()


def materialise_position_ids(model: torch.nn.Module) -> None:
    """Rebuild the ``position_ids`` buffers left on the meta device by ``assign=True`` loading."""
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                if name != "position_ids":
                    raise RuntimeError(f"buffer {name} of {type(module).__name__} was not loaded")
                module.register_buffer(name, torch.arange(buf.shape[-1]).expand(buf.shape).clone(), persistent=False)


def read_open_clip_arch(directory: Path, default: OpenClipArch) -> OpenClipArch:
    path = directory / OPEN_CLIP_CONFIG
    if not path.is_file():
        return default
    try:
        return OpenClipArch.from_config(json.loads(path.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: not an open_clip model config ({error!r}); expected {{'model_cfg': {{...}}}}") from error


def open_clip_transform(
    directory: Path, arch: OpenClipArch, default_mode: Literal["pad", "crop", "squash"], resample: Resampler = "pil",
) -> ImageTransform:
    """The image transform of an open_clip model dir: ``preprocess_cfg`` of its config, else ``default_mode``.

    open_clip's eval transforms are torchvision ``Resize`` / ``CenterCrop`` on PIL images, so a
    crop starts at ``round(excess / 2)`` (``crop="round"``).
    """
    path = directory / OPEN_CLIP_CONFIG
    cfg = json.loads(path.read_text()).get("preprocess_cfg", {}) if path.is_file() else {}
    modes = {"longest": "pad", "shortest": "crop", "squash": "squash"}
    mode = modes.get(cfg.get("resize_mode", ""), default_mode)
    kwargs = {k: tuple(cfg[k]) for k in ("mean", "std") if k in cfg}
    return ImageTransform(size=arch.image_size, mode=mode, crop="round", resample=resample, **kwargs)  # type: ignore[arg-type]


def open_clip_clean(text: str) -> str:
    """open_clip's prompt cleaning before BPE: ``ftfy.fix_text``, ``html.unescape`` twice, strip,
    every whitespace run to one space, strip, lower case (curly quotes -> straight, ``&amp;`` -> ``&``,
    ligatures split, full-width -> ASCII)."""
    import ftfy
    import regex

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


# --------------------------------------------------------------------------- the scorer


@dataclass(frozen=True)
class Affine:
    """``score = (raw - shift) / scale``."""

    shift: float = 0.0
    scale: float = 1.0


class ClipScorer:
    """``(images, prompts) -> Tensor[B]`` from a ``CLIPModel``: ``cos(i, t)`` or ``exp(logit_scale) cos(i, t)``.

    Images and prompts are scored in chunks of ``batch_size`` on ``device`` under ``no_grad``;
    a row with a non-finite pixel scores NaN. The result is float32 on the images' device.
    """

    def __init__(
        self,
        name: str,
        model: Any,
        tokenizer: Any,
        transform: ImageTransform,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        dtype: str = "float32",
        use_logit_scale: bool = False,
        output: Affine = Affine(),
        clean_text: Callable[[str], str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"{name}: batch_size must be >= 1, got {batch_size}")
        self.name = name
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, name)
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform
        self.batch_size = batch_size
        self.use_logit_scale = use_logit_scale
        self.output = output
        self.clean_text = clean_text
        self.max_length = int(model.config.text_config.max_position_embeddings)

    def __repr__(self) -> str:
        return f"ClipScorer({self.name!r}, device={self.device}, dtype={self.dtype}, transform={self.transform})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        raw = score_in_batches(images, prompts, self.name, self.batch_size, self._raw)
        return ((raw - self.output.shift) / self.output.scale).to(images.device)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``[B, max_length]``: cleaned (if the reward cleans), cut at the context."""
        texts = [self.clean_text(p) for p in prompts] if self.clean_text else list(prompts)
        return self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")

    def _raw(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = self.transform(images.to(self.device)).to(self.dtype)
        tokens = self.tokenize(prompts)
        image_emb = _pooled(self.model.get_image_features(pixel_values=pixels))
        text_emb = _pooled(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device),
        ))
        cos = (F.normalize(image_emb.float(), dim=-1) * F.normalize(text_emb.float(), dim=-1)).sum(dim=-1)
        if self.use_logit_scale:
            cos = self.model.logit_scale.float().exp() * cos
        return cos.cpu()


def _pooled(out: Any) -> torch.Tensor:
    """Projected features from ``get_*_features`` (a tensor before transformers 5, an output object after)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def resolve_dtype(name: str, reward: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"{reward}: dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _clip_tokenizer(directory: Path) -> Any:
    """The fast (``tokenizers``) CLIP tokenizer, as ``CLIPProcessor`` loads it (transformers 4's slow one differs)."""
    from transformers import CLIPTokenizerFast

    return CLIPTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def _hf_clip(directory: Path) -> Any:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)


# --------------------------------------------------------------------------- registered rewards


@register_reward("hps")
def build_hps(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    resample: Resampler = "pil",
) -> ClipScorer:
    """HPS v2.1: ``cos(i, t)`` of open_clip ViT-H-14 with the HPS weights (``weights_dir``: see mixgrpo.rewards.cache).

    Preprocessing as HPSv2's ``ResizeMaxSize(224, fill=0)`` (``mode="pad"``); prompts cleaned as open_clip does.
    """
    root = check_weights_dir("hps", resolve_weights_dir(weights_dir, cache_dir=cache_dir))
    arch = read_open_clip_arch(root, VIT_H_14)
    tokenizer = _clip_tokenizer(root)
    model = load_open_clip_as_hf(root / HPS_CHECKPOINT, arch, tokenizer)
    transform = ImageTransform(size=arch.image_size, mode="pad", pad_value=0, resample=resample)
    return ClipScorer(
        "hps", model, tokenizer, transform, device=device, batch_size=batch_size, dtype=dtype, clean_text=open_clip_clean,
    )


PickScoreNorm = Literal["train", "report", "raw"]
_PICKSCORE_OUTPUT: dict[str, Affine] = {
    "train": Affine(PICKSCORE_SHIFT, PICKSCORE_SCALE),
    "report": Affine(0.0, 100.0),
    "raw": Affine(),
}


@register_reward("pickscore")
def build_pickscore(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: str = "float32",
    normalize: PickScoreNorm = "train",
    cache_dir: str | Path | None = None,
    resample: Resampler = "pil",
) -> ClipScorer:
    """PickScore: ``s = exp(logit_scale) cos(i, t)``; ``normalize`` train ``(s-18)/8`` | report ``s/100`` | raw ``s``."""
    if normalize not in _PICKSCORE_OUTPUT:
        raise ValueError(f"pickscore: normalize must be one of {', '.join(_PICKSCORE_OUTPUT)}, got {normalize!r}")
    root = check_weights_dir("pickscore", resolve_weights_dir(weights_dir, cache_dir=cache_dir))
    model = _hf_clip(root)
    transform = transform_from_processor_config(root, int(model.config.vision_config.image_size), resample)
    return ClipScorer(
        "pickscore", model, _clip_tokenizer(root), transform, device=device, batch_size=batch_size, dtype=dtype,
        use_logit_scale=True, output=_PICKSCORE_OUTPUT[normalize],
    )


@register_reward("clip")
def build_clip(
    weights_dir: str | Path,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    resample: Resampler = "pil",
) -> ClipScorer:
    """CLIP score ``cos(i, t)`` (DFN5B-CLIP-ViT-H-14-384): a ``CLIPModel`` dir, or an open_clip dir
    (``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, converted like HPS).

    Prompts are cleaned as open_clip does (the reference is open_clip) in both layouts; the image
    geometry follows the dir's own description (``preprocessor_config.json``: transformers' rules;
    ``preprocess_cfg`` of ``open_clip_config.json``: open_clip's)."""
    root = check_weights_dir("clip", resolve_weights_dir(weights_dir, cache_dir=cache_dir))
    tokenizer = _clip_tokenizer(root)
    if (root / "config.json").is_file():
        model = _hf_clip(root)
        transform = transform_from_processor_config(root, int(model.config.vision_config.image_size), resample)
    else:
        arch = read_open_clip_arch(root, VIT_H_14)
        model = load_open_clip_as_hf(root / OPEN_CLIP_WEIGHTS, arch, tokenizer)
        transform = open_clip_transform(root, arch, default_mode="crop", resample=resample)
    return ClipScorer(
        "clip", model, tokenizer, transform, device=device, batch_size=batch_size, dtype=dtype, clean_text=open_clip_clean,
    )
