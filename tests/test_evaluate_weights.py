"""``evaluate --tuned`` on a corrupt or partial weights folder (issue 13, item 11): one clear error naming
the file and the fix, before any model loads; a folder with a MANIFEST.json is verified against it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mixgrpo.evaluate import check_weights_dir
from mixgrpo.storage import fetch_dir, publish_dir
from tests.test_train import tiny_model_dir  # noqa: F401 - the fixture

WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def weights_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


def copy(weights_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(weights_dir, tmp_path / "tuned"))


def test_complete_folder_passes(weights_dir, tmp_path):
    check_weights_dir(copy(weights_dir, tmp_path))


def test_missing_safetensors_names_the_folder_and_the_fix(weights_dir, tmp_path):
    tuned = copy(weights_dir, tmp_path)
    (tuned / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tuned / 'transformer'} has config.json but no \*.safetensors .*"
                                                 r"folder is partial; copy the complete OUTPUT_DIR/final"):
        check_weights_dir(tuned)


def test_truncated_safetensors_names_the_file(weights_dir, tmp_path):
    tuned = copy(weights_dir, tmp_path)
    data = (tuned / WEIGHTS).read_bytes()
    (tuned / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{tuned / WEIGHTS} is not a complete safetensors file"):
        check_weights_dir(tuned)


def test_corrupt_config_names_the_file(weights_dir, tmp_path):
    tuned = copy(weights_dir, tmp_path)
    (tuned / "transformer" / "config.json").write_text('{"num_layers": ')
    with pytest.raises(ValueError, match=rf"{tuned / 'transformer' / 'config.json'} is not valid JSON"):
        check_weights_dir(tuned)


def test_manifest_of_a_fetched_folder_is_verified(weights_dir, tmp_path):
    """A same-size bit flip passes every format check; the manifest catches it."""
    store = (tmp_path / "store").as_uri()
    publish_dir(weights_dir, f"{store}/final")
    fetched = tmp_path / "fetched"
    fetch_dir(f"{store}/final", fetched)
    check_weights_dir(fetched)
    data = bytearray((fetched / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (fetched / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"tuned weights: {fetched / WEIGHTS}: sha256 does not match MANIFEST.json"):
        check_weights_dir(fetched)


def test_cli_evaluate_on_a_partial_folder_is_one_error_line(weights_dir, tmp_path):
    tuned = copy(weights_dir, tmp_path)
    (tuned / WEIGHTS).unlink()
    result = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "evaluate", "--tuned", str(tuned), "--out",
                             str(tmp_path / "eval"), f"model.path={weights_dir}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.startswith(f"mixgrpo: error: tuned weights folder {tuned / 'transformer'} has config.json")
