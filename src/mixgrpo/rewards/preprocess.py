"""Image preprocessing shared by the CLIP-family rewards and ImageReward.

Images arrive as float tensors ``(B, 3, H, W)`` in [0, 1]; every reward turns them into
``(B, 3, S, S)`` normalised with a per-channel mean / std. The steps are those of the reference
implementations, on 8-bit images, so that the preprocessing is bit-identical to theirs:

1. **8 bits**: ``u = round(255 * clamp(x, 0, 1))`` as ``uint8`` (round half to even), what the
   reference trainer's ``numpy_to_pil`` does before it scores an image.
2. **Resize** with PIL's ``BICUBIC`` on the 8-bit RGB image (what torchvision's ``Resize`` and
   transformers' CLIP image processor do to PIL images; PIL rounds and clips to 8 bits between its
   horizontal and vertical passes). The geometry, by ``mode``:

   * ``"pad"`` (HPS v2.1, open_clip ``ResizeMaxSize``): longest side to ``S``, the other
     ``round(side * S / longest)``; padded to ``S x S`` with ``pad_value`` (0 = black),
     ``floor(pad / 2)`` on the left / top and the rest on the right / bottom.
   * ``"crop"`` (PickScore, ImageReward, CLIP processors): shortest side to ``S``, the other
     ``int(side * S / shortest)``; then a centre ``S x S`` crop whose offset for an excess ``d``
     is ``d // 2`` (``crop="floor"``, transformers' ``CLIPImageProcessor``) or
     ``round(d / 2)`` half to even (``crop="round"``, torchvision's ``CenterCrop``, used by
     ImageReward and open_clip). The two differ by one pixel when ``d % 4 == 3``.
   * ``"squash"``: resized to ``S x S`` ignoring the aspect ratio.
3. **Normalise**: ``(u / 255 - mean) / std`` in float32.

Deviation kept on purpose: HPSv2's ``ResizeMaxSize`` skips the padding when the longest side
already equals ``S`` and then fails on a non-square input (e.g. 224 x 160); here such an image is
padded like any other.

``resample="torch"`` is an opt-in on-device approximation: step 2 as
``torch.nn.functional.interpolate(mode="bicubic", antialias=True)`` on the float image, clipped and
rounded to 8 bits (same geometry). It is not bit-identical (about one grey level on smooth images,
more on noise); its measured score error is in the README ("Reward fidelity"). Its speed on a GPU
has not been measured.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, used by all rewards here
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["pad", "crop", "squash"]
CropRounding = Literal["floor", "round"]
Resampler = Literal["pil", "torch"]


@dataclass(frozen=True)
class ImageTransform:
    """[0, 1] images -> normalised ``(B, 3, size, size)`` model input (steps in the module doc)."""

    size: int  # output side S, pixels
    mode: ResizeMode = "crop"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_value: int = 0  # 8-bit fill of the padding (mode="pad")
    crop: CropRounding = "floor"  # centre-crop offset rule (mode="crop")
    resample: Resampler = "pil"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ImageTransform.size must be >= 1, got {self.size}")
        if self.mode not in ("pad", "crop", "squash"):
            raise ValueError(f"ImageTransform.mode must be 'pad', 'crop' or 'squash', got {self.mode!r}")
        if self.crop not in ("floor", "round"):
            raise ValueError(f"ImageTransform.crop must be 'floor' or 'round', got {self.crop!r}")
        if self.resample not in ("pil", "torch"):
            raise ValueError(f"resample must be 'pil' (exact, the references' PIL bicubic) or 'torch', got {self.resample!r}")
        if not 0 <= self.pad_value <= 255:
            raise ValueError(f"ImageTransform.pad_value is an 8-bit value in 0..255, got {self.pad_value}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(self.resize_uint8(to_uint8(images)).to(images.device), self.mean, self.std)

    def resize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """8-bit ``(B, 3, H, W)`` -> 8-bit ``(B, 3, S, S)``: step 2 of the module doc (on the CPU for ``"pil"``)."""
        h, w = pixels.shape[-2:]
        plan = plan_geometry(h, w, self.size, self.mode, self.crop)
        if self.resample == "pil":
            resized = pil_bicubic(pixels.cpu(), plan.resized)
        else:
            resized = torch_bicubic(pixels, plan.resized)
        return place(resized, plan, self.pad_value)


@dataclass(frozen=True)
class Geometry:
    """Where an ``H x W`` image goes: resized to ``resized = (h, w)``, then either cut to ``S x S``
    at ``offset = (top, left)`` or (``pad``) placed at ``offset`` in an ``S x S`` canvas."""

    resized: tuple[int, int]
    offset: tuple[int, int]
    size: int
    pad: bool


def crop_offset(excess: int, rule: CropRounding) -> int:
    """Centre-crop start for ``excess = side - S``: ``excess // 2`` (floor) or ``round(excess / 2)`` half to even."""
    return excess // 2 if rule == "floor" else int(round(excess / 2.0))


def plan_geometry(h: int, w: int, size: int, mode: ResizeMode, crop: CropRounding = "floor") -> Geometry:
    """The resize target and crop / pad offset of an ``h x w`` image (formulas in the module doc)."""
    if mode == "squash":
        return Geometry((size, size), (0, 0), size, pad=False)
    if mode == "pad":
        scale = size / float(max(h, w))
        new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
        return Geometry((new_h, new_w), ((size - new_h) // 2, (size - new_w) // 2), size, pad=True)
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    return Geometry((new_h, new_w), (crop_offset(new_h - size, crop), crop_offset(new_w - size, crop)), size, pad=False)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``round(255 * clamp(x, 0, 1))`` as ``uint8`` (round half to even, like numpy's ``round``)."""
    return (images.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def pil_bicubic(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """8-bit ``(B, 3, H, W)`` on the CPU resized to ``size = (h, w)`` by PIL's ``BICUBIC``, image by image."""
    from PIL import Image

    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    arrays = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    resized = [np.asarray(Image.fromarray(a).resize((size[1], size[0]), Image.Resampling.BICUBIC)) for a in arrays]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2)


def torch_bicubic(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The on-device approximation of :func:`pil_bicubic`: antialiased float bicubic, rounded and clipped to 8 bits."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    out = F.interpolate(pixels.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def place(resized: torch.Tensor, plan: Geometry, pad_value: int = 0) -> torch.Tensor:
    """Cut (or pad) a resized ``(B, C, h, w)`` batch to ``S x S`` at ``plan.offset``."""
    (h, w), (top, left), size = plan.resized, plan.offset, plan.size
    if plan.pad:
        # F.pad takes (left, right, top, bottom) for the last two dimensions.
        return F.pad(resized, (left, size - w - left, top, size - h - top), value=pad_value)
    return resized[..., top : top + size, left : left + size]


def normalize(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(u / 255 - mean) / std`` per channel in float32 (torchvision ``ToTensor`` + ``Normalize``)."""
    x = pixels.float() / 255.0
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def transform_from_processor_config(model_dir: str | Path, default_size: int, resample: Resampler = "pil") -> ImageTransform:
    """The :class:`ImageTransform` a Hugging Face ``preprocessor_config.json`` describes (transformers' rules).

    Reads ``size`` (``shortest_edge`` -> crop; ``height``/``width`` without centre crop ->
    squash), ``crop_size``, ``image_mean`` and ``image_std`` (``resample`` must be bicubic); the
    crop offset is transformers' ``excess // 2``. A missing file gives the CLIP default
    (``default_size``, crop, CLIP mean / std).
    """
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return ImageTransform(size=default_size, resample=resample)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the model's original files") from error
    if cfg.get("resample", 3) != 3:  # PIL.Image.BICUBIC
        raise ValueError(f"{path}: resample {cfg['resample']} is not bicubic (3); only bicubic resizing is implemented")
    common = dict(mean=tuple(cfg.get("image_mean", CLIP_MEAN)), std=tuple(cfg.get("image_std", CLIP_STD)), resample=resample)
    size = cfg.get("size", default_size)
    crop = cfg.get("crop_size", size)
    if isinstance(size, dict) and "shortest_edge" in size:
        side = _side(crop, path) if cfg.get("do_center_crop", True) else int(size["shortest_edge"])
        return ImageTransform(size=side, mode="crop", crop="floor", **common)  # type: ignore[arg-type]
    if cfg.get("do_center_crop", False):
        return ImageTransform(size=_side(crop, path), mode="crop", crop="floor", **common)  # type: ignore[arg-type]
    return ImageTransform(size=_side(size, path), mode="squash", **common)  # type: ignore[arg-type]


def _side(value: int | dict, path: Path) -> int:
    if isinstance(value, int):
        return value
    if "height" in value and "width" in value and value["height"] == value["width"]:
        return int(value["height"])
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    raise ValueError(f"{path}: unsupported size {value!r}; expected a square size or shortest_edge")


def check_batch(images: torch.Tensor, prompts: list[str], reward: str) -> None:
    """Raise a clear error unless ``images`` is ``(B, 3, H, W)`` with one prompt per image."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{reward} reward takes images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{reward} reward got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")


def finite_rows(images: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: rows whose pixels are all finite (the others score NaN, a failed sample)."""
    return torch.isfinite(images.reshape(images.shape[0], -1)).all(dim=1)


def score_in_batches(
    images: torch.Tensor,
    prompts: list[str],
    reward: str,
    batch_size: int,
    raw_fn: Callable[[torch.Tensor, list[str]], torch.Tensor],
) -> torch.Tensor:
    """``[B]`` raw scores: ``raw_fn`` over chunks of ``batch_size``, NaN on rows with a non-finite pixel.

    Checks the batch, scores bad rows on zeros (so one failed sample cannot poison a chunk) and puts
    NaN back on them. The result stays on the device ``raw_fn`` returns it on.
    """
    check_batch(images, prompts, reward)
    ok = finite_rows(images)
    safe = torch.where(ok.view(-1, 1, 1, 1), images, torch.zeros((), dtype=images.dtype, device=images.device))
    chunks = [raw_fn(safe[i : i + batch_size], prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    raw = torch.cat(chunks) if chunks else torch.zeros(0)
    return torch.where(ok.to(raw.device), raw, torch.full_like(raw, float("nan")))
