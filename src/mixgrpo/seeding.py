"""Seeds by name: every random stream of a run is drawn from a generator seeded by what it is for.

``derive_seed(seed, iteration, stream, group)`` hashes its parts, so a stream depends only on its
name (never on the order of draws or on which rank draws it): the property that makes a resumed
run and a W-process run reproduce a 1-process run bit for bit (see :mod:`mixgrpo.train`).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any parts: ``sha256("seed/iteration/stream/...")``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

def generator_for(*parts: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(*parts)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))
