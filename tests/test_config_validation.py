"""Every config value is range-checked at load time (issue 13, item 3): the error names the key,
and ``mixgrpo config`` refuses the value before anything trains."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mixgrpo.config import ConfigError, load_config

BAD_VALUES = [
    ("optim.max_grad_norm=-1", "optim.max_grad_norm"),
    ("optim.max_grad_norm=0", "optim.max_grad_norm"),
    ("optim.betas=[0.9,1.0]", "optim.betas"),
    ("optim.betas=[-0.1,0.999]", "optim.betas"),
    ("optim.eps=0", "optim.eps"),
    ("optim.weight_decay=-0.01", "optim.weight_decay"),
    ("optim.kl_coeff=-1", "optim.kl_coeff"),
    ("optim.clip_range=1.5", "optim.clip_range"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("sampling.eta=.nan", "sampling.eta"),
    ("sampling.shift=0", "sampling.shift"),
    ("eval_images_per_prompt=0", "eval_images_per_prompt"),
    ("eval_every=-1", "eval_every"),
    ("rewards.names=[toy_object_colour]", "rewards.names: unknown reward 'toy_object_colour'"),
    ("rewards.names=[toy_shape,toy_shape]", "rewards.names"),
    ("rewards.held_out=[realism]", "rewards.held_out: unknown reward 'realism'"),
    ("rewards.options={nope: {}}", "rewards.options: unknown reward 'nope'"),
    ("rewards.advantage_clip=0", "rewards.advantage_clip"),
    ("rewards.weights={toy_shape: -1.0}", "rewards.weights"),
    ("rewards.max_failed_fraction=1.5", "rewards.max_failed_fraction"),
    ("rewards.failure_window=0", "rewards.failure_window"),
    ("window.shift_interval=0", "window.shift_interval"),
    ("window.stride=-1", "window.stride"),
    ("window.interval_min=0", "window.interval_min"),
    ("window.interval_max=0", "window.interval_max"),
    ("model.height=721", "model.height"),
    ("model.lora_rank=-2", "model.lora_rank"),
    ("model.lora_alpha=0", "model.lora_alpha"),
    ("model.max_sequence_length=0", "model.max_sequence_length"),
]


@pytest.mark.parametrize("override, key", BAD_VALUES)
def test_out_of_range_value_is_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(overrides=[override])
    assert str(error.value).startswith(key), str(error.value)


def test_yaml_file_values_are_checked_too(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  max_grad_norm: -1\n")
    with pytest.raises(ConfigError, match="optim.max_grad_norm=-1.0 must be > 0"):
        load_config(path)


def test_valid_edges_are_accepted():
    cfg = load_config(overrides=["optim.betas=[0.0,0.0]", "optim.weight_decay=0", "window.stride=0",
                                 "rewards.max_failed_fraction=1", "eval_every=0", "rewards.held_out=[]"])
    assert cfg.optim.betas == (0.0, 0.0) and cfg.window.stride == 0


def test_mixgrpo_config_refuses_a_negative_clip_norm():
    result = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "config", "optim.max_grad_norm=-1"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "optim.max_grad_norm=-1.0 must be > 0" in result.stderr and "Traceback" not in result.stderr
