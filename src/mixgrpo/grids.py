"""Image grids: the pictures people look at instead of tables."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL image."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def image_grid(images: torch.Tensor, columns: int, *, scale: int = 1, padding: int = 2,
               row_labels: list[str] | None = None, column_labels: list[str] | None = None,
               label_width: int = 0) -> Image.Image:
    """Tile (B, 3, H, W) images row-major into a grid, optionally labelled, upscaled by ``scale``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"image_grid expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
    count, _, height, width = images.shape
    rows = (count + columns - 1) // columns
    cell_h, cell_w = height * scale, width * scale
    top = 14 if column_labels else 0
    left = label_width if row_labels else 0
    grid = Image.new("RGB", (left + columns * (cell_w + padding) + padding, top + rows * (cell_h + padding) + padding), "white")
    draw = ImageDraw.Draw(grid)
    for index in range(count):
        r, c = divmod(index, columns)
        tile = to_pil(images[index]).resize((cell_w, cell_h), Image.NEAREST)
        grid.paste(tile, (left + padding + c * (cell_w + padding), top + padding + r * (cell_h + padding)))
    for c, label in enumerate(column_labels or []):
        draw.text((left + padding + c * (cell_w + padding), 1), label, fill="black")
    for r, label in enumerate(row_labels or []):
        draw.text((2, top + padding + r * (cell_h + padding) + cell_h // 2 - 5), label[: max(label_width // 6, 1)], fill="black")
    return grid


def save_grid(images: torch.Tensor, path: str | Path, columns: int, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns, **kwargs).save(path)
    return path


def seed_diversity_per_prompt(images: torch.Tensor, per_prompt: int) -> torch.Tensor:
    """[P]: per prompt, the per-pixel std across its ``per_prompt`` seeds, averaged over pixels (NaN if < 2 seeds).

    ``images`` is prompt-major ((P*per_prompt, 3, H, W) in [0, 1]).
    """
    grouped = images.float().reshape(-1, per_prompt, *images.shape[1:])
    if per_prompt < 2:
        return torch.full((grouped.shape[0],), float("nan"))
    return grouped.std(dim=1).flatten(1).mean(dim=1)


def seed_diversity(images: torch.Tensor, per_prompt: int) -> float:
    """Mean over prompts of :func:`seed_diversity_per_prompt`.

    A policy that collapses to one image per prompt (a common form of reward hacking) drives this
    towards 0. Never optimised.
    """
    if per_prompt < 2:
        return float("nan")
    return float(seed_diversity_per_prompt(images, per_prompt).mean())
