"""Hardening of the training loop (issue 13): what a planted checkpoint, a missing checkpoint,
a dead reward, a bad prompt file or a kill -9 do to a run."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model
from mixgrpo.train import _seal, checkpoint_dirs, load_checkpoint, save_checkpoint
from tests.test_train import TINY, read_metrics, tiny_config


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_toy_model(ToyFlowModel(TINY), tmp_path_factory.mktemp("tiny") / "model")


class WritesMarker:
    """A pickle payload: unpickling it calls ``Path.touch(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def planted_checkpoint(tmp_path: Path, victim: str) -> tuple[Path, Path]:
    """A valid checkpoint whose ``victim`` file is replaced by a code-running pickle, manifest re-sealed."""
    cfg = tiny_config(tmp_path / "model-unused", tmp_path / "run")
    module = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    module(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "run", 3, dict(module.state_dict()), optimizer.state_dict(), cfg)
    marker = tmp_path / "payload-ran"
    payload = {"torch": WritesMarker(marker)} if victim == "rng.pt" else {"state": WritesMarker(marker)}
    tmp = path.parent / ".tmp-planted"
    path.rename(tmp)
    (tmp / victim).write_bytes(pickle.dumps(payload))
    (tmp / "MANIFEST.json").unlink()
    _seal(tmp, path, 3)   # the attacker can rewrite the sha256 manifest too
    return path, marker


def test_checkpoint_round_trips_optimizer_and_rng_without_pickle_code(tmp_path):
    cfg = tiny_config(tmp_path / "model-unused", tmp_path / "run")
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), betas=(0.8, 0.9))
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path / "run", 7, dict(module.state_dict()), optimizer.state_dict(), cfg)
    expected_draw = torch.rand(3)
    torch.manual_seed(99)
    iteration, model_state, optimizer_state = load_checkpoint(path)
    assert iteration == 7 and torch.equal(torch.rand(3), expected_draw)          # RNG restored
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters())
    fresh.load_state_dict(optimizer_state)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.9)
    saved = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], saved)
    for name in ("optimizer.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)                               # loadable without code


@pytest.mark.parametrize("victim", ["optimizer.pt", "rng.pt"])
def test_planted_pickle_in_checkpoint_is_refused_and_never_runs(tmp_path, victim):
    path, marker = planted_checkpoint(tmp_path, victim)
    with pytest.raises(RuntimeError, match=f"{victim} holds objects other than tensors.*refusing"):
        load_checkpoint(path)
    assert not marker.exists(), "the pickle payload ran"


def test_planted_checkpoint_in_the_store_is_refused_on_resume(tmp_path, tiny_model_dir):
    """A checkpoint planted under checkpoint_uri is fetched by --resume, then refused before unpickling."""
    from mixgrpo.storage import publish_dir
    from mixgrpo.train import train

    path, marker = planted_checkpoint(tmp_path, "optimizer.pt")
    store = (tmp_path / "store").as_uri()
    publish_dir(path, f"{store}/{path.name}", metadata={"iteration": 3})
    cfg = tiny_config(tiny_model_dir, tmp_path / "fresh", max_iterations=4, checkpoint_uri=store)
    with pytest.raises(RuntimeError, match="optimizer.pt holds objects other than tensors"):
        train(cfg, resume=True)
    assert not marker.exists()
