"""The shared evaluation sampler and the bootstrap CIs (issue 10.4)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mixgrpo.config import load_config
from mixgrpo.eval_sampler import DIVERSITY, eval_rows, evaluate_policy, sample_eval_images
from mixgrpo.stats import bootstrap_ci, paired_bootstrap_ci

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model

    torch.manual_seed(0)
    return save_toy_model(ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1,
                                                      attention_head_dim=32)), tmp_path_factory.mktemp("tiny") / "model")


def tiny_config(model_dir: Path, **extra: object):
    return load_config(overrides={"model.path": str(model_dir), "sampling.num_steps": 6,
                                  "rewards.names": ["toy_object_color", "toy_background"],
                                  "rewards.held_out": ["toy_heldout_realism"], "eval_images_per_prompt": 4, **extra})


def test_sampler_is_seed_deterministic_and_independent_of_the_batch(tiny_model_dir: Path) -> None:
    from mixgrpo.policies import build_policy

    cfg = tiny_config(tiny_model_dir)
    policy = build_policy(cfg, CPU)
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    rows, seeds = eval_rows(prompts, 4)
    assert rows == [prompts[0]] * 4 + [prompts[1]] * 4 and seeds == [0, 1, 2, 3] * 2
    first = sample_eval_images(policy, rows, seeds, cfg, CPU)
    assert torch.equal(first, sample_eval_images(policy, rows, seeds, cfg, CPU))  # bit for bit
    again = sample_eval_images(policy, rows, seeds, cfg, CPU, batch_size=3)  # other batches, same rows
    assert torch.allclose(first, again, atol=1e-5)
    alone = sample_eval_images(policy, [prompts[1]], [2], cfg, CPU)
    assert torch.allclose(alone[0], first[6], atol=1e-6)  # a row depends only on its prompt and seed
    assert not torch.allclose(first[0], first[1], atol=1e-3)  # other seeds, other images


def test_trainer_and_evaluate_score_the_same_images(tiny_model_dir: Path, tmp_path: Path) -> None:
    """train.held_out_rewards (the trainer) and evaluate (the CLI / pipeline) give the same numbers."""
    import json

    from mixgrpo.evaluate import evaluate
    from mixgrpo.policies import build_policy, build_rewards
    from mixgrpo.distributed import World
    from mixgrpo.train import held_out_rewards

    cfg = tiny_config(tiny_model_dir)
    policy = build_policy(cfg, CPU)
    prompts = ["a red circle on a black background", "a green triangle on a white background",
               "a blue square on a black background"]
    rewards = build_rewards(cfg, ["toy_object_color", "toy_background", "toy_heldout_realism"], CPU)
    trainer = held_out_rewards(policy, rewards, prompts, cfg, World())
    tuned = tmp_path / "tuned"
    policy.module.save_pretrained(tuned / "transformer")
    result = evaluate(cfg, tuned, tmp_path / "eval", prompts=prompts, images_per_prompt=4)
    for name, value in trainer.items():
        assert result.base[name] == pytest.approx(value, abs=1e-6), name
        assert result.tuned[name] == pytest.approx(value, abs=1e-6), name  # tuned = base weights here
    assert result.delta[DIVERSITY] == pytest.approx(0.0, abs=1e-6)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["combined"]["delta_ci95"] == pytest.approx([0.0, 0.0], abs=1e-6)
    low, high = metrics["ci95"]["toy_object_color"]["base"]
    assert low <= metrics["base"]["toy_object_color"] <= high
    lines = (tmp_path / "eval" / "scores.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 3 * 4  # every prompt x 4 seeds x (base, tuned)
    record = json.loads(lines[5])
    assert (record["prompt_index"], record["seed"], record["model"]) == (1, 1, "base")
    assert (tmp_path / "eval" / record["file"]).is_file()
    _, _, per_prompt = evaluate_policy(policy, rewards, prompts, 4, cfg, CPU)
    assert per_prompt["toy_object_color"][1] == pytest.approx(
        np.mean([json.loads(lines[4 + k])["scores"]["toy_object_color"] for k in range(4)]), abs=1e-6)


def test_bootstrap_ci_on_hand_made_data() -> None:
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    assert bootstrap_ci([0.3]) == (0.3, 0.3)
    assert all(np.isnan(bootstrap_ci([])))
    assert bootstrap_ci([1.0, np.nan, 1.0]) == (1.0, 1.0)  # NaN prompts are dropped
    # Half zeros, half ones, n = 20: the mean's sd is 0.5/sqrt(20) = 0.112, so the 95% CI is about 0.5 -+ 0.22.
    low, high = bootstrap_ci([0.0, 1.0] * 10)
    assert low == pytest.approx(0.5 - 1.96 * 0.5 / np.sqrt(20), abs=0.03)
    assert high == pytest.approx(0.5 + 1.96 * 0.5 / np.sqrt(20), abs=0.03)
    assert bootstrap_ci([0.0, 1.0] * 10, seed=3) == bootstrap_ci([0.0, 1.0] * 10, seed=3)


def test_bootstrap_ci_matches_scipy() -> None:
    from scipy.stats import bootstrap

    values = np.random.default_rng(1).gamma(2.0, 0.1, size=18)
    ours = bootstrap_ci(values, resamples=20_000)
    ref = bootstrap((values,), np.mean, confidence_level=0.95, method="percentile", n_resamples=20_000,
                    random_state=np.random.default_rng(2)).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.004)


def test_paired_ci_resamples_per_prompt_differences() -> None:
    base = np.random.default_rng(0).uniform(0, 1, size=12)
    assert paired_bootstrap_ci(base + 0.1, base) == pytest.approx((0.1, 0.1))  # constant shift: no spread
    unpaired = bootstrap_ci(base + 0.1)
    assert unpaired[1] - unpaired[0] > 0.1  # the prompts' own spread is what pairing removes
    with pytest.raises(ValueError, match="one tuned and one base value per prompt"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])
