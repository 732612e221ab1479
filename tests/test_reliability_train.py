"""Hardening of the training loop (issue 13): what a planted checkpoint, a missing checkpoint,
a dead reward, a bad prompt file or a kill -9 do to a run."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from mixgrpo.checkpoint import _seal, checkpoint_dirs, load_checkpoint, save_checkpoint
from tests.test_train import read_metrics, tiny_config, tiny_model_dir  # noqa: F401 - the fixture


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


# --------------------------------------------------------------------------- --resume without a checkpoint (item 4)


def test_resume_without_checkpoint_says_it_starts_from_scratch(tiny_model_dir, tmp_path, capsys):
    from mixgrpo.train import train

    train(tiny_config(tiny_model_dir, tmp_path / "run", max_iterations=1, checkpoint_every=0), resume=True)
    out = capsys.readouterr().out
    assert f"--resume: no complete checkpoint in {tmp_path / 'run' / 'checkpoints'}; starting from scratch" in out


def test_require_checkpoint_fails_when_there_is_none(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    args = [sys.executable, "-m", "mixgrpo.cli", "train", f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
            "max_iterations=1", "progress_bar=false", "--require-checkpoint"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "--require-checkpoint: no complete checkpoint in" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- reward outage (item 6)


class FailingReward:
    """Scores 1.0, except NaN for the first ``int(fraction * B)`` samples of every batch."""

    def __init__(self, name: str, fraction: float):
        self.name, self.fraction = name, fraction

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        scores = images.float().mean(dim=(1, 2, 3))
        scores[: int(self.fraction * len(prompts))] = float("nan")
        return scores


def _register_failing_rewards() -> None:
    from mixgrpo.rewards.base import _REGISTRY, register_reward

    for name, fraction in (("test_dead_reward", 1.0), ("test_flaky_reward", 0.75), ("test_shaky_reward", 0.25)):
        if name not in _REGISTRY:
            register_reward(name)(lambda name=name, fraction=fraction, **_: FailingReward(name, fraction))


def test_a_reward_failing_for_every_sample_stops_the_run(tiny_model_dir, tmp_path):
    from mixgrpo.train import RewardOutageError, train

    _register_failing_rewards()
    cfg = tiny_config(tiny_model_dir, tmp_path / "dead", **{"rewards.names": ["toy_object_color", "test_dead_reward"]})
    with pytest.raises(RewardOutageError, match="reward 'test_dead_reward' failed for all 8 samples of iteration 1"):
        train(cfg)
    assert not checkpoint_dirs(tmp_path / "dead")               # stopped before the first update was saved


def test_a_mostly_failing_reward_stops_after_the_window(tiny_model_dir, tmp_path):
    from mixgrpo.train import RewardOutageError, train

    _register_failing_rewards()
    cfg = tiny_config(tiny_model_dir, tmp_path / "flaky", max_iterations=4, checkpoint_every=0,
                      **{"rewards.names": ["test_flaky_reward"], "rewards.failure_window": 2})
    with pytest.raises(RewardOutageError, match=r"'test_flaky_reward' failed for 75% of the samples of iterations 1-2"):
        train(cfg)
    records = [r for r in read_metrics(tmp_path / "flaky") if "loss" in r]
    assert [r["iteration"] for r in records] == [1]
    assert records[0]["advantage"]["failed"]["test_flaky_reward"] == 6        # failures stay counted


def test_occasional_failures_below_the_limit_train_on_and_are_counted(tiny_model_dir, tmp_path):
    from mixgrpo.train import train

    _register_failing_rewards()
    cfg = tiny_config(tiny_model_dir, tmp_path / "shaky", max_iterations=2, checkpoint_every=0,
                      **{"rewards.names": ["test_shaky_reward"], "rewards.held_out": []})
    train(cfg)
    records = [r for r in read_metrics(tmp_path / "shaky") if "loss" in r]
    assert [r["advantage"]["failed"]["test_shaky_reward"] for r in records] == [2, 2]


# --------------------------------------------------------------------------- kill -9 then --resume: metrics (item 10)


def test_resume_after_a_crash_leaves_no_duplicate_metrics(tiny_model_dir, tmp_path):
    """Iteration 3 was logged, then the process died before checkpoint 3 (and mid-way through a line)."""
    import shutil

    from mixgrpo.train import train

    run = tmp_path / "run"
    train(tiny_config(tiny_model_dir, run, max_iterations=3, checkpoint_every=2))
    shutil.rmtree(run / "checkpoints" / "checkpoint-000003")    # the kill came before this checkpoint
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + '\n{"iteration": 3, "loss": 0.1, "rew')  # torn line
    train(tiny_config(tiny_model_dir, run, max_iterations=3, checkpoint_every=2), resume=True)
    iterations = [r["iteration"] for r in read_metrics(run) if "loss" in r]
    assert iterations == [1, 2, 3]
    assert sum(1 for r in read_metrics(run) if r.get("final")) == 1


# --------------------------------------------------------------------------- S3 outage while uploading a checkpoint (item 10)


def test_s3_outage_during_checkpoint_upload_is_one_error_line(tiny_model_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "us-east-1", "MIXGRPO_S3_MAX_ATTEMPTS": "2"}
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    args = [sys.executable, "-m", "mixgrpo.cli", "train", f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}",
            "max_iterations=2", "checkpoint_every=1", "progress_bar=false", "prompts_per_iteration=1",
            "sampling.group_size=2", "sampling.num_steps=6", "window.size=2", "optim.train_batch_size=2",
            "eval_images_per_prompt=1", "checkpoint_uri=s3://ckpt/run"]
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("mixgrpo: error: cannot reach S3 endpoint") and "s3://ckpt/run/checkpoint-000001" in last
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-000001" / "MANIFEST.json").is_file()  # the local copy stays


# --------------------------------------------------------------------------- keep_checkpoints in the object store (item 9)


@pytest.mark.integration
def test_keep_checkpoints_prunes_the_store_too(tiny_model_dir, tmp_path, s3_server, monkeypatch):
    import uuid

    from mixgrpo.storage import latest_complete, open_store
    from mixgrpo.train import train

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    uri = f"s3://{s3_server.bucket}/keep-{uuid.uuid4().hex[:8]}"
    train(tiny_config(tiny_model_dir, tmp_path / "run", max_iterations=4, checkpoint_every=1, keep_checkpoints=2,
                      checkpoint_uri=uri))
    dirs = sorted({key.split("/")[0] for key in open_store(uri).list()})
    assert dirs == ["checkpoint-000003", "checkpoint-000004", "final"]
    assert latest_complete(uri, "checkpoint-").endswith("checkpoint-000004")


def test_checkpoint_carries_the_object_store_manifest_and_names_a_corrupt_file(tmp_path):
    """One manifest format: a local checkpoint is sealed as the store seals a published directory."""
    from mixgrpo.checkpoint import CheckpointError
    from mixgrpo.storage import verify_local_dir

    cfg = tiny_config(tmp_path / "model-unused", tmp_path / "run")
    module = torch.nn.Linear(2, 2)
    path = save_checkpoint(tmp_path / "run", 4, dict(module.state_dict()), torch.optim.AdamW(module.parameters()).state_dict(), cfg)
    manifest = verify_local_dir(path)
    assert manifest.metadata == {"iteration": 4}
    assert {f.path for f in manifest.files} == {"model.safetensors", "optimizer.pt", "rng.pt", "config.yaml",
                                                "trainer_state.json"}
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 does not match MANIFEST\.json"):
        load_checkpoint(path)
