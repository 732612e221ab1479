"""The weight EMA (``optim.ema_decay``): the formula on hand-made numbers, evaluation swaps, and the trainer's use."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.checkpoint import checkpoint_dirs, load_ema_state
from mixgrpo.config import ConfigError, load_config
from mixgrpo.ema import WeightEMA, maybe_applied
from mixgrpo.train import train

from test_train import final_state, read_metrics, tiny_config, tiny_model_dir  # noqa: F401 (fixture)


def two_parameter_module() -> torch.nn.Module:
    module = torch.nn.Linear(2, 1)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 2.0]]))
        module.bias.copy_(torch.tensor([4.0]))
    module.bias.requires_grad_(False)  # frozen: not averaged
    return module


def test_update_is_d_ema_plus_one_minus_d_theta():
    module = two_parameter_module()
    ema = WeightEMA(module, 0.9)
    assert set(ema.shadow) == {"weight"}
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[11.0, -8.0]]))
    ema.update(module)                                   # 0.9 * [1, 2] + 0.1 * [11, -8]
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[2.0, 1.0]]))
    ema.update(module)                                   # 0.9 * [2, 1] + 0.1 * [11, -8]
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[2.9, 0.1]]))


def test_applied_swaps_the_average_in_and_the_live_weights_back():
    module = two_parameter_module()
    ema = WeightEMA(module, 0.5)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[3.0, 4.0]]))
    ema.update(module)                                   # [2, 3]
    with ema.applied(module):
        torch.testing.assert_close(module.weight.detach(), torch.tensor([[2.0, 3.0]]))
    torch.testing.assert_close(module.weight.detach(), torch.tensor([[3.0, 4.0]]))
    with pytest.raises(RuntimeError), ema.applied(module):   # restored even when the block fails
        raise RuntimeError("evaluation failed")
    torch.testing.assert_close(module.weight.detach(), torch.tensor([[3.0, 4.0]]))
    with maybe_applied(None, module):
        torch.testing.assert_close(module.weight.detach(), torch.tensor([[3.0, 4.0]]))
    ema.copy_to(module)
    torch.testing.assert_close(module.weight.detach(), torch.tensor([[2.0, 3.0]]))
    assert float(module.bias) == 4.0


def test_state_round_trip_and_bad_values():
    module = two_parameter_module()
    ema = WeightEMA(module, 0.9)
    other = WeightEMA(torch.nn.Linear(2, 1), 0.9)
    other.load_state_dict(ema.state_dict() | {"bias": torch.zeros(1)})
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({})
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay"):
            WeightEMA(module, decay)
    with pytest.raises(ConfigError, match="optim.ema_decay=1.0 must be in"):
        load_config(overrides={"optim.ema_decay": 1.0})
    with pytest.raises(ConfigError, match="ema_decay needs replicated weights"):
        load_config(overrides={"optim.ema_decay": 0.9, "distributed.engine": "fsdp"})


def test_trainer_evaluates_and_ships_the_average(tiny_model_dir, tmp_path):
    """Checkpoints hold the live weights and the average; the final weights are the average; with select_best the
    validation evaluation scored the average (the same numbers as the final held-out evaluation at the end)."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "ema", max_iterations=3, checkpoint_every=3,
                      **{"optim.lr": 1e-3, "optim.ema_decay": 0.5})
    result = train(cfg)
    checkpoint = checkpoint_dirs(tmp_path / "ema")[-1]
    live, average = load_file(checkpoint / "model.safetensors"), load_ema_state(checkpoint)
    shipped = load_file(result.final_weights / "transformer" / "diffusion_pytorch_model.safetensors")
    assert set(average) == set(live)
    assert all(torch.equal(shipped[k], average[k]) for k in average)
    assert any(not torch.equal(live[k], average[k]) for k in average)
    base = load_file(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    for k in average:  # after 3 updates at d=0.5 the average sits strictly between the base and the live weights
        moved, lagged = (live[k] - base[k]).abs().sum(), (average[k] - base[k]).abs().sum()
        assert moved == 0 or 0 < lagged < moved + 1e-12

    from mixgrpo.evaluate import config_provenance

    provenance = config_provenance(cfg, tmp_path / "ema" / "metrics.jsonl")   # the report says these are averaged
    assert provenance["weight_average"] == "EMA, decay 0.5" and provenance["processes"] == 1
    plain = tiny_config(tiny_model_dir, tmp_path / "plain", max_iterations=3, checkpoint_every=3, **{"optim.lr": 1e-3})
    train(plain)
    assert load_ema_state(checkpoint_dirs(tmp_path / "plain")[-1]) is None
    assert all(torch.equal(final_state(tmp_path / "plain")[k], live[k]) for k in live)  # rollouts used live weights


def test_resume_restores_the_average_bit_for_bit(tiny_model_dir, tmp_path):
    ema = {"optim.ema_decay": 0.7, "optim.lr": 1e-3}
    train(tiny_config(tiny_model_dir, tmp_path / "straight", max_iterations=4, checkpoint_every=2, **ema))
    train(tiny_config(tiny_model_dir, tmp_path / "resumed", max_iterations=2, checkpoint_every=2, **ema))
    train(tiny_config(tiny_model_dir, tmp_path / "resumed", max_iterations=4, checkpoint_every=2, **ema), resume=True)
    a, b = (load_ema_state(checkpoint_dirs(tmp_path / run)[-1]) for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    finals = [[r for r in read_metrics(tmp_path / run) if r.get("final")][-1]["held_out"] for run in ("straight", "resumed")]
    assert finals[0] == finals[1]
