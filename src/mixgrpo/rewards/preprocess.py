"""Image preprocessing shared by the CLIP-family rewards, done in torch on the reward's device.

Images arrive as float tensors ``(B, 3, H, W)`` in [0, 1]; every reward turns them into
``(B, 3, S, S)`` normalised with a per-channel mean / std, ``x' = (x - mean) / std``:

* ``mode="pad"`` (HPS v2.1, open_clip ``ResizeMaxSize``): the longest side to ``S``, bicubic, the
  other side ``round(side * S / longest)``; then padded to ``S x S`` with ``pad_value`` (0 = black,
  before normalisation), ``floor(pad / 2)`` on the left / top and the rest on the right / bottom.
* ``mode="crop"`` (ImageReward, PickScore, CLIP processors): the shortest side to ``S``, bicubic,
  the other side ``int(side * S / shortest)``; then a centre crop, offset ``round((side - S) / 2)``.
* ``mode="squash"``: resized to ``S x S`` ignoring the aspect ratio.

Bicubic resizing is ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, the
kernel torchvision applies to tensors and the one that mirrors PIL's ``BICUBIC`` (the references
resize PIL images; the difference is about one grey level of 255). The references that resize
8-bit PIL images also clip the result to [0, 1] (``clamp=True``); HPS resizes a float tensor and
does not.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, used by all rewards here
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["pad", "crop", "squash"]


@dataclass(frozen=True)
class ImageTransform:
    """[0, 1] images -> normalised ``(B, 3, size, size)`` model input."""

    size: int  # output side S, pixels
    mode: ResizeMode = "crop"
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    pad_value: float = 0.0  # fill of the padding in [0, 1] space (mode="pad")
    clamp: bool = True  # clip resized values to [0, 1], as 8-bit PIL resizing does

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ImageTransform.size must be >= 1, got {self.size}")
        if self.mode not in ("pad", "crop", "squash"):
            raise ValueError(f"ImageTransform.mode must be 'pad', 'crop' or 'squash', got {self.mode!r}")

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if self.mode == "pad":
            x = resize_longest_and_pad(x, self.size, self.pad_value, clamp=self.clamp)
        elif self.mode == "crop":
            x = center_crop(resize_shortest(x, self.size, clamp=self.clamp), self.size)
        else:
            x = bicubic(x, (self.size, self.size), clamp=self.clamp)
        return normalize(x, self.mean, self.std)


def bicubic(images: torch.Tensor, size: tuple[int, int], *, clamp: bool) -> torch.Tensor:
    """Antialiased bicubic resize of ``(B, C, H, W)`` to ``size = (h, w)``; a no-op at equal size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    out = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0.0, 1.0) if clamp else out


def resize_shortest(images: torch.Tensor, size: int, *, clamp: bool) -> torch.Tensor:
    """Shortest side to ``size``, the other ``int(other * size / shortest)`` (torchvision ``Resize(int)``)."""
    h, w = images.shape[-2:]
    if h <= w:
        new = (size, int(size * w / h))
    else:
        new = (int(size * h / w), size)
    return bicubic(images, new, clamp=clamp)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop; top = ``round((H - size) / 2)`` like torchvision ``CenterCrop``."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from a {h}x{w} image; resize it first")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return images[..., top : top + size, left : left + size]


def resize_longest_and_pad(images: torch.Tensor, size: int, pad_value: float = 0.0, *, clamp: bool = False) -> torch.Tensor:
    """Longest side to ``size`` (bicubic), then pad to a square (open_clip ``ResizeMaxSize``)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)
    x = bicubic(images, (new_h, new_w), clamp=clamp)
    pad_h, pad_w = size - new_h, size - new_w
    # F.pad takes (left, right, top, bottom) for the last two dimensions.
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=pad_value)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(x - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def transform_from_processor_config(model_dir: str | Path, default_size: int) -> ImageTransform:
    """The :class:`ImageTransform` a Hugging Face ``preprocessor_config.json`` describes.

    Reads ``size`` (``shortest_edge`` -> crop; ``height``/``width`` without centre crop ->
    squash), ``crop_size``, ``image_mean`` and ``image_std`` (``resample`` must be bicubic); a
    missing file gives the CLIP default (``default_size``, crop, CLIP mean / std).
    """
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return ImageTransform(size=default_size)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); restore it from the model's original files") from error
    if cfg.get("resample", 3) != 3:  # PIL.Image.BICUBIC
        raise ValueError(f"{path}: resample {cfg['resample']} is not bicubic (3); only bicubic resizing is implemented")
    mean = tuple(cfg.get("image_mean", CLIP_MEAN))
    std = tuple(cfg.get("image_std", CLIP_STD))
    size = cfg.get("size", default_size)
    crop = cfg.get("crop_size", size)
    if isinstance(size, dict) and "shortest_edge" in size:
        side = _side(crop, path) if cfg.get("do_center_crop", True) else int(size["shortest_edge"])
        return ImageTransform(size=side, mode="crop", mean=mean, std=std)  # type: ignore[arg-type]
    if cfg.get("do_center_crop", False):
        return ImageTransform(size=_side(crop, path), mode="crop", mean=mean, std=std)  # type: ignore[arg-type]
    return ImageTransform(size=_side(size, path), mode="squash", mean=mean, std=std)  # type: ignore[arg-type]


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
