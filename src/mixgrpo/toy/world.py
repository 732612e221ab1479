"""The toy world: 32x32 RGB images of one coloured shape on a plain background.

Prompts read ``"a <colour> <shape> on a <colour> background"`` with six colours (the corners
of the RGB cube but cyan and magenta, so any two palette colours are at least 1.0 apart) and
three shapes. Every shape fills a square box of half-side ``r`` (6-10 px) centred within
``CENTER_JITTER`` px of the image centre: a circle of radius ``r``, an axis-aligned square, an
upright triangle with base and height ``2r``. (Shapes anywhere in the image took a 0.6M-parameter
model far more pre-training than a 2-core CPU affords before it drew anything but blobs.) Edges are anti-aliased
with the signed distance to the shape (coverage ``clamp(0.5 - d, 0, 1)`` in pixels).

Everything here is deterministic given a ``torch.Generator``.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

import torch

from mixgrpo.selection import VALIDATION_COUNT

IMAGE_SIZE = 32
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MIN_HALF_SIZE = 6.0  # pixels; the smallest rendered shape spans 12 px
MAX_HALF_SIZE = 10.0  # pixels; the largest spans 20 px of 32
CENTER_JITTER = 4.0  # pixels; a shape's box centre is uniform within +-4 px of the image centre, each axis
PROMPT_TEMPLATE = "a {object_color} {shape} on a {background} background"


@dataclass(frozen=True)
class ToyPrompt:
    """One point of the world: the object's colour and shape and the background colour."""

    object_color: str
    shape: str
    background: str

    @property
    def text(self) -> str:
        return PROMPT_TEMPLATE.format(object_color=self.object_color, shape=self.shape, background=self.background)


def _vocabulary_hint() -> str:
    return f"expected {PROMPT_TEMPLATE!r} with colours {', '.join(COLORS)} and shapes {', '.join(SHAPES)}"


def parse_prompt(prompt: str) -> ToyPrompt:
    """Parse a toy-world prompt (case and extra spaces are ignored); anything else is an error."""
    words = prompt.lower().split()
    valid = (
        len(words) == 7
        and words[0] == "a"
        and words[3:5] == ["on", "a"]
        and words[6] == "background"
        and words[1] in COLORS
        and words[2] in SHAPES
        and words[5] in COLORS
    )
    if not valid:
        raise ValueError(f"{prompt!r} is not a toy-world prompt: {_vocabulary_hint()}")
    if words[1] == words[5]:
        raise ValueError(f"{prompt!r} asks for the same object and background colour; pick two different colours")
    return ToyPrompt(object_color=words[1], shape=words[2], background=words[5])


def all_prompts() -> list[str]:
    """Every prompt of the world (object colour != background colour), in a fixed order."""
    return [
        ToyPrompt(color, shape, background).text
        for color, shape, background in itertools.product(COLORS, SHAPES, COLORS)
        if color != background
    ]


def _covers_vocabulary(prompts: list[str]) -> bool:
    parsed = [parse_prompt(p) for p in prompts]
    return (
        {p.object_color for p in parsed} == set(COLORS)
        and {p.background for p in parsed} == set(COLORS)
        and {p.shape for p in parsed} == set(SHAPES)
    )


def train_test_split(test_fraction: float = 0.22, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split ``all_prompts()`` into (train, held-out) combinations, deterministically per seed.

    The training half always contains every colour (as object and as background) and every
    shape, so the held-out prompts are new *combinations* of known words.
    """
    if not 0.0 < test_fraction < 0.5:
        raise ValueError(f"test_fraction must be in (0, 0.5), got {test_fraction}")
    prompts = all_prompts()
    num_test = round(len(prompts) * test_fraction)
    rng = random.Random(seed)
    for _ in range(1000):
        order = rng.sample(prompts, len(prompts))
        train, test = order[num_test:], order[:num_test]
        if _covers_vocabulary(train):
            return sorted(train), sorted(test)
    raise RuntimeError(f"no split with test_fraction={test_fraction} keeps every word in training; lower it")


def train_validation_test_split(validation_count: int = VALIDATION_COUNT, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, held-out test): ``train_test_split`` with ``validation_count`` training prompts
    set aside, so that choices (best checkpoint, learning rate) are never made on the reported test prompts.

    The remaining training prompts still cover every word; the test split is the same as ``train_test_split``'s.
    """
    train, test = train_test_split(seed=seed)
    rng = random.Random(seed + 1)
    for _ in range(1000):
        validation = set(rng.sample(train, validation_count))
        rest = [p for p in train if p not in validation]
        if _covers_vocabulary(rest):
            return rest, sorted(validation), test
    raise RuntimeError(f"no validation split of {validation_count} prompts keeps every word in training; lower it")


def color_tensor(names: list[str]) -> torch.Tensor:
    """Colour names -> (N, 3) RGB in [0, 1]."""
    return torch.tensor([COLORS[name] for name in names], dtype=torch.float32)


def shape_coverage(shape_ids: torch.Tensor, centers: torch.Tensor, half_sizes: torch.Tensor, size: int) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] of shapes on a ``size`` x ``size`` pixel grid.

    shape_ids: (N,) indices into ``SHAPES``; centers: (N, 2) as (x, y) in pixels, pixel ``j``
    spanning [j, j+1); half_sizes: (N,) half-side ``r`` of each shape's square box.
    Returns (N, size, size).
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords.view(1, 1, size) - centers[:, 0].view(-1, 1, 1)
    dy = coords.view(1, size, 1) - centers[:, 1].view(-1, 1, 1)
    r = half_sizes.view(-1, 1, 1)
    circle = torch.sqrt(dx**2 + dy**2) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    # Upright triangle: apex (0, -r), base corners (+-r, r); max of the three edges' distances.
    slanted = (2 * dx.abs() - (dy + r)) / math.sqrt(5.0)
    triangle = torch.maximum(dy - r, slanted)
    distance = torch.stack([circle, square, triangle], dim=1)  # (N, 3, size, size)
    chosen = distance.gather(1, shape_ids.view(-1, 1, 1, 1).expand(-1, 1, size, size)).squeeze(1)
    return (0.5 - chosen).clamp(0.0, 1.0)


def render_batch(prompts: list[ToyPrompt], generator: torch.Generator,
                 half_sizes: torch.Tensor | None = None) -> torch.Tensor:
    """Render prompts at random sizes (or the given ``half_sizes``, (N,)) and positions near the centre:
    (N, 3, 32, 32) in [0, 1]."""
    n = len(prompts)
    if half_sizes is None:
        half_sizes = MIN_HALF_SIZE + (MAX_HALF_SIZE - MIN_HALF_SIZE) * torch.rand(n, generator=generator)
    centers = IMAGE_SIZE / 2 + CENTER_JITTER * (2 * torch.rand(n, 2, generator=generator) - 1)
    shape_ids = torch.tensor([SHAPES.index(p.shape) for p in prompts])
    alpha = shape_coverage(shape_ids, centers, half_sizes, IMAGE_SIZE).unsqueeze(1)
    foreground = color_tensor([p.object_color for p in prompts]).view(n, 3, 1, 1)
    background = color_tensor([p.background for p in prompts]).view(n, 3, 1, 1)
    return alpha * foreground + (1 - alpha) * background


def render(prompt: ToyPrompt, generator: torch.Generator) -> torch.Tensor:
    """Render one prompt at a random size and position near the centre: (3, 32, 32) in [0, 1]."""
    return render_batch([prompt], generator)[0]
