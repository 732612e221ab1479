"""Toy-world rewards: what the prompt asks for, measured on pixels. Each is in [0, 1], 1 = perfect.

Trained on (registered names):
  - ``toy_object_color``: the non-background mass is object-coloured, over at least
    ``MIN_OBJECT_AREA`` pixels (no object, or a wrong colour, scores ~0).
  - ``toy_background``: the share of pixels in the background colour, full marks from 55 %
    (every size the world renders earns them, so it pushes no size; haze and oversized objects lose).
  - ``toy_shape``: soft IoU of the object region with the prompt's shape drawn in a
    *square* box fitted to that region (a template stretched to the region's bounding box was
    gamed by tall bars), rescaled so IoU 0.5 scores 0, times the IoU's lead over the best other
    shape (full marks from ``SHAPE_MARGIN``): a compromise shape that fits every template about
    equally scores ~0 for every shape word, a wrong shape 0.
  - ``toy_contrast``: an aesthetic, twice the standard deviation of luminance (pushes towards
    large objects and extreme luminance, partly against the colour rewards).
Never trained on:
  - ``toy_heldout_realism`` (function ``realism``): the share of pixels within a tolerance of
    one of the prompt's two colours, or on a one-pixel anti-aliased edge between them; rendered
    images of every size score ~1, noise, haze, blur and off-palette colours score low. A sanity
    check for reward hacking.

Pixel-to-colour closeness is ``clamp(1 - |rgb - colour| / 0.6, 0, 1)``; palette colours are
at least 1.0 apart. The object region reads each pixel as a mix of the prompt's background
and object colours (as anti-aliased edges are), so rendered images score ~1 on colour. A row whose image holds a non-finite value scores NaN (a failed sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from mixgrpo.rewards.base import register_reward
from mixgrpo.toy.world import SHAPES, color_tensor, parse_prompt, shape_coverage

COLOR_TOLERANCE = 0.6  # RGB distance at which closeness reaches 0
MIN_OBJECT_AREA = 40.0  # pixels an object needs for full object-colour marks
BACKGROUND_FULL_MARKS = 0.55  # background share that earns 1.0 (the largest rendered square leaves ~58 %)
SHAPE_IOU_FLOOR = 0.5  # IoU mapped to 0 (chance-level overlap); a circle fits a square template at ~0.83
SHAPE_MARGIN = 0.1  # IoU lead over the best-fitting other shape that earns full marks (rendered shapes lead by >= 0.13)
REALISM_TOLERANCE = 0.15  # RGB distance for a pixel to count as one of the prompt's colours
LUMA = (0.299, 0.587, 0.114)

# Per shape (SHAPES order): area / r^2 for half-side r, and how far the centroid lies below
# the box centre in units of r (the triangle's apex is at -r, its base at +r).
_AREA_PER_HALF_SIDE_SQUARED = (math.pi, 4.0, 2.0)
_CENTROID_BELOW_CENTER = (0.0, 0.0, 1.0 / 3.0)


@dataclass(frozen=True)
class _Targets:
    object_rgb: torch.Tensor  # (B, 3)
    background_rgb: torch.Tensor  # (B, 3)
    shape_ids: torch.Tensor  # (B,)


def _targets(images: torch.Tensor, prompts: list[str]) -> _Targets:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"toy rewards take images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    parsed = [parse_prompt(p) for p in prompts]
    return _Targets(
        object_rgb=color_tensor([p.object_color for p in parsed]).to(images.device),
        background_rgb=color_tensor([p.background for p in parsed]).to(images.device),
        shape_ids=torch.tensor([SHAPES.index(p.shape) for p in parsed], device=images.device),
    )


def _distance(images: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    """Per-pixel RGB distance to one colour per row: (B, H, W)."""
    return (images - rgb.view(-1, 3, 1, 1)).norm(dim=1)


def _closeness(images: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    return (1 - _distance(images, rgb) / COLOR_TOLERANCE).clamp(min=0.0)


def _as_mix(images: torch.Tensor, t: _Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel read as the mix ``bg + a * (obj - bg)`` (anti-aliased edges are such mixes): ``(a, distance)``,
    ``a`` in [0, 1] its projection on the segment from background to object colour, ``distance`` its RGB distance
    from that segment; both (B, H, W)."""
    axis = (t.object_rgb - t.background_rgb).view(-1, 3, 1, 1)
    offset = images - t.background_rgb.view(-1, 3, 1, 1)
    a = ((offset * axis).sum(1) / axis.square().sum(1)).clamp(0.0, 1.0)
    return a, (offset - a.unsqueeze(1) * axis).norm(dim=1)


def _object_fraction(images: torch.Tensor, t: _Targets) -> torch.Tensor:
    """How much of each pixel is the object: (B, H, W) in [0, 1]: its mix ``a`` (``_as_mix``), discounted by its
    distance from the segment."""
    a, off_segment = _as_mix(images, t)
    return a * (1 - off_segment / COLOR_TOLERANCE).clamp(min=0.0)


def _drop_faint(fraction: torch.Tensor) -> torch.Tensor:
    """Map 0.1 -> 0 and 0.9 -> 1: faint haze counts for nothing, and the remap, symmetric about
    0.5, keeps the area of anti-aliased edges."""
    return ((fraction - 0.1) / 0.8).clamp(0.0, 1.0)


def _failed_as_nan(images: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    failed = ~torch.isfinite(images).flatten(1).all(dim=1)
    return scores.masked_fill(failed, float("nan"))


def object_color(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Object mass over non-background mass (the latter at least ``MIN_OBJECT_AREA`` pixels).

    Non-background mass counts each pixel's distance from the background colour in units of
    the object's distance, so a rendered image scores 1 and a wrong colour ~0; both masses
    drop faint pixels (``_drop_faint``).
    """
    t = _targets(images, prompts)
    span = (t.object_rgb - t.background_rgb).norm(dim=1).view(-1, 1, 1)
    foreground = _drop_faint(_distance(images, t.background_rgb) / span)
    on_object = _drop_faint(_object_fraction(images, t))
    score = on_object.sum((1, 2)) / foreground.sum((1, 2)).clamp(min=MIN_OBJECT_AREA)
    return _failed_as_nan(images, score.clamp(0.0, 1.0))


def background(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Share of background-coloured pixels, 1.0 from ``BACKGROUND_FULL_MARKS``."""
    t = _targets(images, prompts)
    share = _closeness(images, t.background_rgb).mean((1, 2))
    return _failed_as_nan(images, (share / BACKGROUND_FULL_MARKS).clamp(0.0, 1.0))


def _fit_template(region: torch.Tensor, shape_id: int) -> torch.Tensor:
    """The shape ``shape_id`` drawn in a square box with the region's area and centroid: (B, H, W).

    The template is never stretched to the region's bounding box (that was gamed by tall bars).
    """
    size = region.shape[-1]
    coords = torch.arange(size, dtype=region.dtype, device=region.device) + 0.5
    area = region.sum((1, 2)).clamp(min=1e-6)
    cx = (region.sum(1) * coords).sum(1) / area
    cy = (region.sum(2) * coords).sum(1) / area
    half = torch.sqrt(area / _AREA_PER_HALF_SIDE_SQUARED[shape_id])
    cy = cy - _CENTROID_BELOW_CENTER[shape_id] * half
    shape_ids = torch.full_like(area, shape_id, dtype=torch.long)
    return shape_coverage(shape_ids, torch.stack([cx, cy], 1), half, size)


def _template_iou(region: torch.Tensor, shape_id: int) -> torch.Tensor:
    template = _fit_template(region, shape_id)
    inter = torch.minimum(region, template).sum((1, 2))
    union = torch.maximum(region, template).sum((1, 2)).clamp(min=1e-6)
    return inter / union


def shape(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """How well the object region is the prompt's shape *and not another one*:
    ``fit * lead`` with ``fit = (IoU_asked - 0.5) / 0.5`` and ``lead = (IoU_asked - max IoU_other) / SHAPE_MARGIN``,
    each clamped to [0, 1]; IoU against each shape's template fitted in a square box (``_fit_template``).

    The lead term makes a compromise shape (a blob or a cross that fits every template about equally)
    score ~0 for every shape word, so one drawing cannot serve all prompts. Faint pixels are dropped first
    (``_drop_faint``), so haze neither adds area nor moves the centroid.
    """
    t = _targets(images, prompts)
    region = _drop_faint(_object_fraction(images, t))
    ious = torch.stack([_template_iou(region, k) for k in range(len(SHAPES))], dim=1)
    iou = ious.gather(1, t.shape_ids.view(-1, 1)).squeeze(1)
    others = ious.scatter(1, t.shape_ids.view(-1, 1), float("-inf")).max(dim=1).values
    present = region.sum((1, 2)) >= 1.0
    fit = ((iou - SHAPE_IOU_FLOOR) / (1 - SHAPE_IOU_FLOOR)).clamp(0.0, 1.0)
    lead = ((iou - others) / SHAPE_MARGIN).clamp(0.0, 1.0)
    score = fit * lead * present
    return _failed_as_nan(images, score.clamp(0.0, 1.0))


def contrast(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Aesthetic: 2 x the standard deviation of luminance (1.0 = half black, half white)."""
    _targets(images, prompts)
    luma = (images * torch.tensor(LUMA, device=images.device).view(1, 3, 1, 1)).sum(1)
    return _failed_as_nan(images, (2 * luma.flatten(1).std(dim=1, unbiased=False)).clamp(0.0, 1.0))


def _next_to(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the pixel or one of its 8 neighbours is in ``mask``."""
    return torch.nn.functional.max_pool2d(mask.float().unsqueeze(1), 3, stride=1, padding=1).squeeze(1) > 0


def realism(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Held-out sanity measure: the share of plausible pixels -- within 0.15 of the object or the background
    colour, or a mix of the two (within 0.15 of the segment between them) that touches a pixel of each, as the
    one-pixel anti-aliased edge of a rendered shape does. Rendered shapes of every size score ~1 (counting edges
    as implausible made larger objects look less real); noise, haze, blur and off-palette colours score low.
    """
    t = _targets(images, prompts)
    near_object = _distance(images, t.object_rgb) < REALISM_TOLERANCE
    near_background = _distance(images, t.background_rgb) < REALISM_TOLERANCE
    _, off_segment = _as_mix(images, t)
    edge = (off_segment < REALISM_TOLERANCE) & _next_to(near_object) & _next_to(near_background)
    plausible = near_object | near_background | edge
    return _failed_as_nan(images, plausible.float().mean((1, 2)))


class ToyReward:
    """A toy reward with the registry's interface: ``reward(images, prompts) -> Tensor[B]``."""

    def __init__(self, name: str, score: Callable[[torch.Tensor, list[str]], torch.Tensor]):
        self.name = name
        self._score = score

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return self._score(images.float(), prompts)

    def __repr__(self) -> str:
        return f"ToyReward({self.name!r})"


@register_reward("toy_object_color")
def build_object_color() -> ToyReward:
    return ToyReward("toy_object_color", object_color)


@register_reward("toy_background")
def build_background() -> ToyReward:
    return ToyReward("toy_background", background)


@register_reward("toy_shape")
def build_shape() -> ToyReward:
    return ToyReward("toy_shape", shape)


@register_reward("toy_contrast")
def build_contrast() -> ToyReward:
    return ToyReward("toy_contrast", contrast)


@register_reward("toy_heldout_realism")
def build_realism() -> ToyReward:
    return ToyReward("toy_heldout_realism", realism)


TRAINING_REWARDS = ("toy_object_color", "toy_background", "toy_shape", "toy_contrast")
HELDOUT_REWARDS = ("toy_heldout_realism",)
