"""Reference preprocessing of the reward models, rebuilt for the tests from the references' documented steps.

The reference packages cannot be installed here (open_clip / HPSv2 / ImageReward import torchvision,
which has no CPU build for this torch), so each reference path is assembled from installable,
independent pieces, following the references step by step:

* the trainer's 8-bit copy: diffusers' ``postprocess``, clamp to [0, 1], then ``numpy_to_pil``,
  ``(x * 255).round().astype("uint8")``;
* HPSv2 ``ResizeMaxSize(224, fill=0)``: PIL bicubic to ``round(side * 224 / longest)``, black
  padding ``pad // 2`` left / top (torchvision ``F.resize`` / ``F.pad`` on a PIL image);
* torchvision ``Resize(S)`` + ``CenterCrop(S)`` on a PIL image (ImageReward, open_clip
  "shortest"): shortest side to ``S``, the other ``int(S * long / short)``, crop at
  ``int(round((side - S) / 2.0))``;
* torchvision ``ToTensor`` + ``Normalize``: ``u / 255`` then ``(x - mean) / std`` in float32;
* open_clip's ``SimpleTokenizer``: clean (ftfy, html twice, whitespace, lower), split with
  open_clip's regex, byte-to-unicode, BPE with ``</w>`` word ends, ``[sot] + ids[:75] + [eot]``,
  zero padding to the context length.

PickScore's reference needs nothing here: transformers' own ``CLIPImageProcessor`` (PIL backend)
and ``CLIPTokenizer`` are installable and used directly.
"""

from __future__ import annotations

import html
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import regex
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- images


def trainer_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """diffusers' ``postprocess`` (clamp to [0, 1]) + ``numpy_to_pil``: ``(B, 3, H, W)`` -> 8-bit RGB PIL images."""
    arrays = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32) * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in arrays]


def hps_resize_max_size(image: Image.Image, size: int) -> Image.Image:
    """HPSv2's ``ResizeMaxSize`` (including its padding when the longest side is already ``size``)."""
    width, height = image.size
    scale = size / float(max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    image = image.resize((new_w, new_h), Image.BICUBIC) if scale != 1.0 else image
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(image, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def torchvision_resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` then ``CenterCrop(size)`` on a PIL image."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def torchvision_squash(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize((size, size), BICUBIC)`` on a PIL image (open_clip "squash")."""
    return image.resize((size, size), Image.BICUBIC)


def to_tensor_normalize(images: list[Image.Image], mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """torchvision ``ToTensor`` + ``Normalize``: ``(B, 3, S, S)`` float32."""
    x = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]).float().div(255)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def pil_uint8(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> ``(B, 3, H, W)`` uint8."""
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])


def sample_images(seed: int = 0) -> dict[str, torch.Tensor]:
    """Smooth and noise float images, square, wide, tall, tiny and large (one image each, ``(1, 3, H, W)``)."""
    shapes = {"square": (64, 64), "wide": (40, 130), "tall": (130, 40), "tiny": (5, 7), "large": (600, 450)}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (h, w) in shapes.items():
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        phase = torch.rand(3, 1, 1, generator=g) * 6
        out[f"smooth-{name}"] = (0.5 + 0.45 * torch.sin(3 * xx + 2 * yy + phase))[None]
        out[f"noise-{name}"] = torch.rand(1, 3, h, w, generator=g)
    return out


# --------------------------------------------------------------------------- open_clip's tokenizer


def open_clip_cleaned(text: str) -> str:
    """ftfy, html unescaped twice, whitespace runs to one space, stripped, lower case."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(regex.split(r"\s+", text)).strip().lower()


@lru_cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte map: printable Latin-1 bytes map to themselves, the others to 256 + n."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in kept}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` over a ``vocab.json`` / ``merges.txt`` pair (CLIP's file formats)."""

    PATTERN = regex.compile(
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE
    )

    def __init__(self, directory: Path) -> None:
        self.vocab = json.loads((directory / "vocab.json").read_text())
        lines = [ln for ln in (directory / "merges.txt").read_text().splitlines() if ln and not ln.startswith("#version")]
        self.ranks = {tuple(ln.split()): i for i, ln in enumerate(lines)}
        self.sot, self.eot = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]

    def bpe(self, word: str) -> list[str]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(parts[i], parts[i + 1]) for i in range(len(parts) - 1)]
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def encode(self, text: str) -> list[int]:
        ids = []
        for piece in self.PATTERN.findall(open_clip_cleaned(text)):
            word = "".join(byte_to_unicode()[b] for b in piece.encode("utf-8"))
            ids += [self.vocab[t] for t in self.bpe(word)]
        return ids

    def __call__(self, texts: list[str], context_length: int) -> torch.Tensor:
        """``[B, context_length]``: ``[sot, ids..., eot, 0, ...]``, cut to the context with ``eot`` last."""
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def byte_level_clip_vocab(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """A small CLIP-format vocab covering every byte (alone and word-final) plus the merges spelling ``words``.

    Ids as in CLIP's files: 256 byte symbols, the same with ``</w>``, the merges' results, then
    ``<|startoftext|>`` and ``<|endoftext|>`` last.
    """
    symbols = list(byte_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:  # merge left to right: a, ab, abc, ... (each merge a new vocab entry)
            a, b = parts[0], parts[1]
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
                vocab.setdefault(a + b, len(vocab))
            parts = [a + b, *parts[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


MERGED_WORDS = ["the", "cat", "fish", "fine", "dog", "red", "quote", "and", "tree", "sky", "a"]


def save_byte_level_clip_tokenizer(directory: Path) -> int:
    """Save the byte-level tokenizer (``vocab.json``, ``merges.txt``, transformers' files); returns the vocab size."""
    from transformers import CLIPTokenizer

    vocab, merges = byte_level_clip_vocab(MERGED_WORDS)
    directory.mkdir(parents=True, exist_ok=True)
    CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges]).save_pretrained(str(directory))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return len(vocab)


MAX_RELATIVE_ERROR = 1e-4  # what "the same score as the reference" means here


def check_score_errors(reward: str, resample: str, ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Print the max relative error and the max absolute error over the scores' spread; the exact
    path (``pil``) must be within :data:`MAX_RELATIVE_ERROR` relative, the approximate one (``torch``)
    measurably off yet well within the spread of the scores."""
    assert reference.abs().min() > 1e-4 and reference.std() > 1e-2  # relative errors are defined, samples differ
    relative = ((ours - reference).abs() / reference.abs()).max().item()
    of_spread = ((ours - reference).abs().max() / reference.std()).item()
    print(f"{reward} resample={resample}: max relative score error {relative:.1e}, "
          f"max error / score std {of_spread:.1e}, over {len(ours)} images")
    if resample == "pil":
        assert relative < MAX_RELATIVE_ERROR
    else:
        assert relative > MAX_RELATIVE_ERROR and of_spread < 0.5
