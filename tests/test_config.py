"""The typed config: layers, strictness, presets, round trip."""

import subprocess
import sys

import pytest

from mixgrpo.config import (MODE_PRESETS, MODES, ConfigError, TrainConfig, config_from_dict, config_hash,
                            config_to_dict, load_config)


def test_defaults_are_the_papers_numbers():
    cfg = load_config()
    assert cfg.mode == "mixgrpo"
    assert (cfg.sampling.num_steps, cfg.sampling.shift, cfg.sampling.eta, cfg.sampling.group_size) == (25, 3.0, 0.7, 12)
    assert (cfg.window.size, cfg.window.shift_interval, cfg.window.stride, cfg.window.strategy) == (4, 25, 1, "progressive")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.max_grad_norm, cfg.optim.clip_range) == (1e-5, 1e-4, 1.0, 1e-4)
    assert cfg.optim.betas == (0.9, 0.999) and cfg.rewards.advantage_clip == 5.0


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_preset_applies(mode):
    cfg = load_config(overrides=[f"mode={mode}"])
    flat = config_to_dict(cfg)
    for key, value in MODE_PRESETS[mode].items():
        section, name = key.split(".")
        assert flat[section][name] == value


def test_layers_file_then_overrides_win(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("mode: dancegrpo\nsampling:\n  eta: 0.5\noptim:\n  lr: 2.0e-5\n")
    cfg = load_config(path, ["optim.lr=3e-5"])
    assert cfg.sampling.sde_type == "dance"          # from the preset
    assert cfg.sampling.eta == 0.5                    # the file beats the preset
    assert cfg.optim.lr == 3e-5                       # the command line beats the file


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "unknown key 'optim.lrr'"),
    (["mode=ppo"], "is not one of"),
    (["optim.lr=fast"], "expected a number"),
    (["sampling.group_size=1"], "group_size must be >= 2"),
    (["sampling.num_steps=2.5"], "expected an integer"),
    (["window.strategy=zigzag"], "is not one of"),
    (["sampling.post_solver=dpmsolver++"], "post_ratio"),
    (["rewards.weights={nope: 1.0}"], "not in rewards.names"),
    (["window.max_left=-2"], r"window\.max_left=-2 must be >= 0, or -1"),
    (["window.min_left=8", "window.max_left=6"], r"window\.min_left=8 must be in \[0, window\.max_left=6\]"),
    (["optim"], "section.key=value"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sampling:\n  etta: 0.3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'sampling\.etta'"):
        load_config(path)


def test_round_trip_and_hash():
    cfg = load_config(overrides=["mode=mixgrpo-flash", "rewards.weights={toy_shape: 2.0}"])
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config()) != config_hash(cfg)
    assert isinstance(again, TrainConfig)


def test_cli_help_and_config_errors():
    help_text = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "sample", "bench", "toy", "rewards"):
        assert command in help_text
    bad = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "config", "optim.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown key 'optim.nope'" in bad.stderr
    shown = subprocess.run([sys.executable, "-m", "mixgrpo.cli", "config", "mode=dancegrpo"], capture_output=True, text=True, check=True).stdout
    assert "sde_type: dance" in shown and "eta: 0.3" in shown
