"""Where the code that produced a result came from: the commit recorded with runs and model versions."""

from __future__ import annotations

import os


def resolve_git_sha(given: str = "") -> str:
    """The argument, else $MIXGRPO_IMAGE_TAG (images record their commit there), else the checkout's commit, else ""."""
    if given:
        return given
    from mixgrpo.container_images import TAG_ENV, git_sha

    return os.environ.get(TAG_ENV) or git_sha() or ""
