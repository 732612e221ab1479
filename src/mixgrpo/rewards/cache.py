"""Reward-model weights in the object store, and their local cache.

``cache_reward_weights(name, source, dest, version)`` publishes a reward's files under
``{dest}/{name}/{version}/`` with ``MANIFEST.json`` (paths, sizes, sha256) written last, via
:func:`mixgrpo.storage.publish_dir`. Training and evaluation then build rewards with
``weights_dir=`` that URI: :func:`resolve_weights_dir` downloads it once into
``$MIXGRPO_CACHE/rewards/`` and checks every file against the manifest (a file already there with
the right sha256 is reused, not downloaded again). Nothing is ever fetched from a model hub.

What each reward's directory must hold (``a+b`` = both files, alternatives separated by ``|``):

====================  =========================================================================
``hps``               ``HPS_v2.1_compressed.pt``; a CLIP tokenizer ``tokenizer.json | vocab.json+merges.txt``
                      (from laion/CLIP-ViT-H-14-laion2B-s32B-b79K); optional ``open_clip_config.json``
``pickscore``         a Hugging Face ``CLIPModel`` directory: ``config.json``, weights, a CLIP tokenizer,
                      optional ``preprocessor_config.json`` (PickScore_v1 with the tokenizer and
                      processor files of laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
``clip``              a ``CLIPModel`` directory as above, or an open_clip one:
                      ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``; a CLIP tokenizer
``imagereward``       ``ImageReward.pt``, ``med_config.json``, a BERT tokenizer ``vocab.txt | tokenizer.json``
====================  =========================================================================
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from mixgrpo.storage import (
    MANIFEST_NAME,
    NotFoundError,
    S3Settings,
    StorageError,
    fetch_dir,
    open_store,
    publish_dir,
    read_manifest,
    sha256_file,
)

log = logging.getLogger(__name__)

CACHE_ENV = "MIXGRPO_CACHE"
_CLIP_TOKENIZER = "tokenizer.json|vocab.json+merges.txt"
# Per reward: the file groups its loader needs; each group lists alternatives ("|"), an
# alternative may need several files ("+").
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "hps": ("HPS_v2.1_compressed.pt", _CLIP_TOKENIZER),
    "pickscore": ("config.json", _CLIP_TOKENIZER),
    "clip": ("config.json|open_clip_config.json+open_clip_pytorch_model.bin", _CLIP_TOKENIZER),
    "imagereward": ("ImageReward.pt", "med_config.json", "vocab.txt|tokenizer.json"),
}
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def missing_files(name: str, directory: str | Path) -> list[str]:
    """The file groups of ``REQUIRED_FILES[name]`` that ``directory`` lacks (empty when complete)."""
    if name not in REQUIRED_FILES:
        known = ", ".join(sorted(REQUIRED_FILES))
        hint = " (UnifiedReward runs behind its own server and has no weights here)" if name == "unified" else ""
        raise ValueError(f"no weight layout for reward {name!r}{hint}; rewards with weights: {known}")
    root = Path(directory)

    def present(alternative: str) -> bool:
        return all((root / f).is_file() for f in alternative.split("+"))

    return [group for group in REQUIRED_FILES[name] if not any(present(a) for a in group.split("|"))]


def check_weights_dir(name: str, directory: str | Path) -> Path:
    """``directory`` as a Path; a clear error when it does not exist or lacks a required file."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{name} weights directory {root} does not exist; pass weights_dir= a local directory or an s3:// / file:// URI")
    missing = missing_files(name, root)
    if missing:
        raise FileNotFoundError(
            f"{name} weights directory {root} lacks {', '.join(missing)} ('|' = one of, '+' = all of); "
            f"see mixgrpo.rewards.cache for each reward's layout"
        )
    return root


def default_cache_dir() -> Path:
    """``$MIXGRPO_CACHE/rewards`` if set, else ``~/.cache/mixgrpo/rewards``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mixgrpo") / "rewards"


def is_uri(value: str | os.PathLike[str]) -> bool:
    return urlparse(os.fspath(value)).scheme in ("s3", "file")


def resolve_weights_dir(
    weights_dir: str | os.PathLike[str],
    *,
    cache_dir: str | Path | None = None,
    settings: S3Settings | None = None,
) -> Path:
    """A local directory holding the weights: ``weights_dir`` itself, or a verified local copy of a URI.

    A URI (``s3://`` or ``file://``) must point at a published directory (with its manifest);
    it is fetched into ``cache_dir / <sha256(uri)[:16]>-<last path part>`` and every file is
    checked against the manifest (:class:`mixgrpo.storage.IntegrityError` names a bad file).
    Processes on one machine take turns (a file lock), so a file is downloaded once; files
    already there are re-hashed, not re-downloaded (a few seconds for the 2.5 GB HPS checkpoint).
    """
    text = os.fspath(weights_dir)
    if not text:
        raise ValueError("weights_dir is empty; pass a local directory or an s3:// / file:// URI of cached weights")
    if not is_uri(text):
        return Path(text)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", text.rstrip("/").rsplit("/", 1)[-1])
    local = root / f"{hashlib.sha256(text.rstrip('/').encode()).hexdigest()[:16]}-{tail}"
    local.mkdir(parents=True, exist_ok=True)
    # One download per machine: the ranks of a node wait for the first one, then reuse its files.
    with open(local.with_name(local.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fetch_dir(text, local, verify=True, settings=settings)
    return local


def cache_reward_weights(
    name: str,
    source: str | os.PathLike[str],
    dest_uri: str,
    version: str,
    *,
    settings: S3Settings | None = None,
) -> str:
    """Publish reward ``name``'s files from ``source`` to ``{dest_uri}/{name}/{version}``; returns that URI.

    ``source`` is a local directory or a URI (a published directory, or any prefix of plain
    files). The files are checked against the reward's layout first. When the destination
    already holds a manifest with the same files (paths, sizes, sha256) nothing is uploaded.
    """
    if not _VERSION.fullmatch(version):
        raise ValueError(f"version {version!r} must be letters, digits, '.', '_' or '-' (e.g. v2.1)")
    missing_files(name, ".")  # validates the name before any transfer
    dest = f"{dest_uri.rstrip('/')}/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix=f"mixgrpo-{name}-") as tmp:
        local = _materialise(source, Path(tmp), settings)
        check_weights_dir(name, local)
        if _already_cached(local, dest, settings):
            log.info("%s weights already cached at %s (same files and sha256)", name, dest)
            return dest
        publish_dir(local, dest, metadata={"reward": name, "version": version, "source": os.fspath(source)}, settings=settings)
    return dest


def _materialise(source: str | os.PathLike[str], tmp: Path, settings: S3Settings | None) -> Path:
    """A local directory with ``source``'s files (``source`` itself when it is local)."""
    text = os.fspath(source)
    if not is_uri(text):
        if not Path(text).is_dir():
            raise FileNotFoundError(f"source {text} is not a directory; pass the directory holding the reward's files or a URI")
        return Path(text)
    try:
        fetch_dir(text, tmp, verify=True, settings=settings)
        (tmp / MANIFEST_NAME).unlink()
    except NotFoundError:  # a plain prefix without a manifest (e.g. a hub mirror)
        copied = open_store(text, settings).get_dir("", tmp)
        if not copied:
            raise StorageError(f"source {text} holds no files; check the URI") from None
    return tmp


def _already_cached(local: Path, dest: str, settings: S3Settings | None) -> bool:
    try:
        manifest = read_manifest(dest, settings)
    except NotFoundError:
        return False
    published = {(f.path, f.size, f.sha256) for f in manifest.files}
    files = [p for p in local.rglob("*") if p.is_file() and p.relative_to(local).as_posix() != MANIFEST_NAME]
    if len(files) != len(published):
        return False
    current = {(p.relative_to(local).as_posix(), p.stat().st_size, sha256_file(p)) for p in files}
    return current == published
