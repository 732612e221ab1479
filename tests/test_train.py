"""The training loop on a tiny toy model: it learns something, stops, checkpoints and resumes bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mixgrpo.config import load_config
from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig, save_toy_model
from mixgrpo.checkpoint import checkpoint_dirs
from mixgrpo.seeding import derive_seed
from mixgrpo.train import post_window_states, rowwise_step, train, trained_steps

TINY = ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=32)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_toy_model(ToyFlowModel(TINY), tmp_path_factory.mktemp("tiny") / "model")


def tiny_config(model_dir: Path, output_dir: Path, **overrides):
    values = {
        "model.path": str(model_dir), "output_dir": str(output_dir), "max_iterations": 3,
        "prompts_per_iteration": 2, "sampling.group_size": 4, "sampling.num_steps": 8,
        "window.size": 2, "window.shift_interval": 1, "optim.train_batch_size": 4,
        "checkpoint_every": 1, "eval_images_per_prompt": 2, "progress_bar": False,
        "rewards.names": ["toy_object_color", "toy_background"], "rewards.held_out": ["toy_heldout_realism"],
    }
    values.update(overrides)
    return load_config(overrides=values)


def read_metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint_dirs(output_dir)[-1] / "model.safetensors")


def test_iterations_update_every_parameter_and_log_metrics(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **{"optim.lr": 1e-3})
    result = train(cfg)
    before = load_file(tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors")
    after = final_state(tmp_path / "run")
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"parameters never updated: {unchanged}"

    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3]                    # stops at max_iterations
    assert [(r["window_start"], r["window_stop"]) for r in records] == [(0, 2), (1, 3), (2, 4)]
    for r in records:
        assert r["nfe_old"] == 8 and r["nfe_train"] == 2 * 2                 # 2 micro-batches x 2 window steps
        assert r["ratio_first_microbatch"] == 1.0                            # old log-probs come from the rollout
        assert r["optimizer_steps"] == 2
        assert set(r["rewards"]) == {"toy_object_color", "toy_background", "toy_heldout_realism"}
        assert r["grad_norm"] > 0 and r["seconds"]["total"] > 0
    # after the first optimiser step of an iteration the policy moved: ratios drift from 1
    assert any(abs(r["ratio_mean"] - 1.0) > 1e-7 for r in records)
    assert (result.final_weights / "transformer" / "config.json").is_file()
    assert set(result.held_out_after) == {"toy_object_color", "toy_background", "toy_heldout_realism", "heldout_diversity"}


def test_resume_is_bit_for_bit(tiny_model_dir, tmp_path):
    straight = tiny_config(tiny_model_dir, tmp_path / "straight", max_iterations=4, checkpoint_every=2)
    train(straight)
    first_half = tiny_config(tiny_model_dir, tmp_path / "resumed", max_iterations=2, checkpoint_every=2)
    train(first_half)
    second_half = tiny_config(tiny_model_dir, tmp_path / "resumed", max_iterations=4, checkpoint_every=2)
    train(second_half, resume=True)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed_iterations = [r["iteration"] for r in read_metrics(tmp_path / "resumed") if "loss" in r]
    assert resumed_iterations == [1, 2, 3, 4]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tiny_model_dir, tmp_path):
    """SIGKILL a real training process after its second checkpoint; --resume finishes it identically."""
    args = [f"model.path={tiny_model_dir}", "max_iterations=5", "prompts_per_iteration=2", "sampling.group_size=4",
            "sampling.num_steps=8", "window.size=2", "window.shift_interval=1", "optim.train_batch_size=4",
            "checkpoint_every=1", "eval_images_per_prompt=1", "progress_bar=false",
            "rewards.names=[toy_object_color]", "rewards.held_out=[]"]
    command = [sys.executable, "-m", "mixgrpo.cli", "train"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run(command + args + [f"output_dir={tmp_path / 'straight'}"], check=True, env=env, capture_output=True)

    victim = subprocess.Popen(command + args + [f"output_dir={tmp_path / 'killed'}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(checkpoint_dirs(tmp_path / "killed")) < 2:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = checkpoint_dirs(tmp_path / "killed")
    assert done and int(done[-1].name.split("-")[1]) < 5, "the run finished before it could be killed"
    resumed = subprocess.run(command + args + [f"output_dir={tmp_path / 'killed'}", "--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dancegrpo_trains_sixty_percent_of_transitions(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "dance", mode="dancegrpo", max_iterations=1, checkpoint_every=0)
    train(cfg)
    record = [r for r in read_metrics(tmp_path / "dance") if "loss" in r][0]
    assert (record["window_start"], record["window_stop"]) == (0, 8)          # every step is SDE
    assert record["nfe_train"] == 2 * int(7 * 0.6)                            # 2 micro-batches x 4 of 7 transitions
    per_row = trained_steps(cfg, range(0, 8), torch.Generator().manual_seed(derive_seed(1)), 6)
    assert len(per_row) == 6 and all(len(steps) == 4 and len(set(steps)) == 4 and max(steps) <= 6 for steps in per_row)
    assert len({tuple(steps) for steps in per_row}) > 1                        # drawn per sample, as DanceGRPO does
    # rows at different steps: the row-wise rule equals the rule applied to each row alone
    from mixgrpo.sampling import dance_sde_step, flow_sigmas

    sigmas, x, v, x_next = flow_sigmas(8, 3.0), torch.randn(6, 5), torch.randn(6, 5), torch.randn(6, 5)
    column = torch.tensor([row[0] for row in per_row])
    log_prob, mean, std = rowwise_step(dance_sde_step, x, v, sigmas, column, 0.7, x_next)
    for r in range(6):
        alone = dance_sde_step(x[r:r + 1], v[r:r + 1], sigmas, int(column[r]), 0.7, prev_sample=x_next[r:r + 1])
        assert torch.allclose(log_prob[r], alone.log_prob[0]) and torch.allclose(mean[r], alone.mean[0]) and torch.allclose(std[r], alone.std)


def test_dancegrpo_scores_the_last_x0_prediction(tiny_model_dir, tmp_path):
    """DanceGRPO decodes pred_original of the last step: the scored images are decode(x - sigma*v), not the noisy sample."""
    from mixgrpo.sampling import flow_sigmas
    from mixgrpo.toy.model import load_toy_model
    from mixgrpo.train import rollout_phase

    cfg = tiny_config(tiny_model_dir, tmp_path / "x0", mode="dancegrpo", **{"sampling.eta": 1.0})
    assert cfg.sampling.decode_pred_x0
    policy = load_toy_model(tiny_model_dir)
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift)
    batch = rollout_phase(policy, ["a red circle on a black background"], cfg, range(0, 8), 0, 0, torch.device("cpu"), sigmas)
    assert torch.allclose(batch.images, policy.decode(batch.rollout.pred_x0))
    assert not torch.allclose(batch.images, policy.decode(batch.rollout.sample))


def test_kl_to_reference_is_zero_at_the_start_and_grows(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "kl", checkpoint_every=0,
                      **{"optim.kl_ref_coeff": 0.04, "optim.lr": 1e-3, "optim.gradient_accumulation_steps": 2})
    train(cfg)
    records = [r for r in read_metrics(tmp_path / "kl") if "loss" in r]
    assert records[0]["optimizer_steps"] == 1
    assert records[0]["kl_ref"] == 0.0 < records[-1]["kl_ref"]   # before the first step the policy is the reference


def test_post_window_states_noise_the_final_sample_at_steps_after_the_window():
    sigmas = torch.linspace(1.0, 0.0, 9)          # 8 steps; the window holds steps 2, 3
    sample = torch.randn(500, 3, 2)
    x, s = post_window_states(sample, sigmas, range(2, 4), torch.Generator().manual_seed(0))
    allowed = sigmas[4:8]                          # every step after the window, none with sigma 0
    assert set(s.tolist()) == set(allowed.tolist())
    eps = (x - (1 - s.view(-1, 1, 1)) * sample) / s.view(-1, 1, 1)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05   # x = (1 - s) x0 + s eps, eps ~ N(0, 1)
    again = post_window_states(sample, sigmas, range(2, 4), torch.Generator().manual_seed(0))
    assert torch.equal(x, again[0]) and torch.equal(s, again[1])
    _, last_two = post_window_states(sample, sigmas, range(2, 4), torch.Generator().manual_seed(0), last_steps=2)
    assert set(last_two.tolist()) == set(sigmas[6:8].tolist())
    _, beyond = post_window_states(sample, sigmas, range(2, 4), torch.Generator().manual_seed(0), last_steps=20)
    assert set(beyond.tolist()) == set(allowed.tolist())   # never a step of the window
    assert post_window_states(sample, sigmas, range(0, 8), torch.Generator()) is None   # every step is SDE


def test_anchor_keeps_the_steps_after_the_window_near_the_base(tiny_model_dir, tmp_path):
    from mixgrpo.toy.model import load_toy_model
    from mixgrpo.train import SectionTimer, anchor_term

    base = load_toy_model(tiny_model_dir)
    prompts = ["a red circle on a black background", "a blue square on a white background"]
    x, s = post_window_states(torch.randn(8, *base.latent_shape()), torch.linspace(1.0, 0.0, 9), range(0, 2),
                              torch.Generator().manual_seed(1))
    cond = base.encode_prompts([p for p in prompts for _ in range(4)])

    def drift(run: str) -> float:
        tuned = load_toy_model(tmp_path / run / "final")
        with torch.no_grad():
            return float(anchor_term(tuned, base, (x, s), cond, cfg, torch.device("cpu"), SectionTimer()).mean())

    common = {"checkpoint_every": 0, "max_iterations": 4, "window.shift_interval": 100, "optim.lr": 3e-3}
    cfg = tiny_config(tiny_model_dir, tmp_path / "unused", **common)
    train(tiny_config(tiny_model_dir, tmp_path / "free", **common))
    train(tiny_config(tiny_model_dir, tmp_path / "anchored", **common, **{"optim.anchor_coeff": 1e3}))
    records = [r for r in read_metrics(tmp_path / "anchored") if "loss" in r]
    assert records[0]["anchor"] >= 0.0 and records[-1]["anchor"] > 0.0
    free, anchored = drift("free"), drift("anchored")
    assert anchored < 0.5 * free


def test_anchor_is_a_no_op_when_every_step_is_sde(tiny_model_dir, tmp_path):
    train(tiny_config(tiny_model_dir, tmp_path / "dance", mode="dancegrpo", checkpoint_every=0, max_iterations=1,
                      **{"optim.anchor_coeff": 1.0}))
    records = [r for r in read_metrics(tmp_path / "dance") if "loss" in r]
    assert records[0]["anchor"] == 0.0 and records[0]["optimizer_steps"] >= 1


def test_select_best_writes_the_best_validation_weights(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "best", checkpoint_every=0, max_iterations=4, eval_every=2,
                      select_best=True, **{"optim.lr": 1e-3})
    result = train(cfg)
    state = json.loads((tmp_path / "best" / "best" / "best.json").read_text())
    assert [h["iteration"] for h in state["history"]] == [0, 2, 4]
    chosen = state["best_iteration"]
    final = [r for r in read_metrics(tmp_path / "best") if r.get("final")][0]
    assert final["selected_iteration"] == chosen
    saved = load_file(result.final_weights / "transformer" / "diffusion_pytorch_model.safetensors")
    best = load_file(tmp_path / "best" / "best" / "model.safetensors")
    assert all(torch.equal(saved[k], best[k]) for k in best)
    from mixgrpo.evaluate import config_provenance

    provenance = config_provenance(cfg, tmp_path / "best" / "metrics.jsonl")   # the report says which weights these are
    assert provenance["weights_of_iteration"].startswith(f"{chosen} (best validation evaluation of 4)")


@pytest.mark.parametrize("mode, nfe_old", [("mixgrpo-flash", None), ("mixgrpo-flash-star", None)])
def test_flash_modes_use_fewer_evaluations(tiny_model_dir, tmp_path, mode, nfe_old):
    cfg = tiny_config(tiny_model_dir, tmp_path / mode, mode=mode, max_iterations=1, checkpoint_every=0)
    train(cfg)
    record = [r for r in read_metrics(tmp_path / mode) if "loss" in r][0]
    assert record["nfe_old"] < 8 and record["ratio_first_microbatch"] == 1.0


def test_shared_prefix_saves_row_evaluations(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path / "late", max_iterations=4, checkpoint_every=0)
    train(cfg)
    record = [r for r in read_metrics(tmp_path / "late") if "loss" in r][-1]
    left, groups, n, steps = record["window_start"], 2, 4, 8
    assert left == 3
    assert record["row_evals_old"] == groups * (left + n * (steps - left))   # prefix once per group


def test_unknown_reward_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown reward 'toy_nope'; known rewards: .*toy_object_color"):
        train(tiny_config(tiny_model_dir, tmp_path / "bad", **{"rewards.names": ["toy_nope"]}))


def test_evaluate_writes_metrics_grid_and_report(tiny_model_dir, tmp_path):
    from mixgrpo.evaluate import evaluate

    cfg = tiny_config(tiny_model_dir, tmp_path / "run", max_iterations=2, **{"optim.lr": 1e-3})
    trained = train(cfg)
    result = evaluate(cfg, trained.final_weights, tmp_path / "eval", images_per_prompt=2,
                      training_metrics=tmp_path / "run" / "metrics.jsonl")
    names = {"toy_object_color", "toy_background", "toy_heldout_realism", "heldout_diversity"}
    assert set(result.base) == set(result.tuned) == names
    for name in names:
        assert result.delta[name] == pytest.approx(result.tuned[name] - result.base[name])
    assert result.base != result.tuned                                   # the tuned weights were really loaded
    same = evaluate(cfg, tiny_model_dir, tmp_path / "eval-same", images_per_prompt=2)
    assert all(abs(v) < 1e-6 for v in same.delta.values())              # same weights + same seeds -> same scores
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["tuned"] == result.tuned
    for name in ("grid.png", "rewards.png", "report.md", "report.html"):
        assert (tmp_path / "eval" / name).stat().st_size > 0
    assert "| toy_heldout_realism | held_out |" in (tmp_path / "eval" / "report.md").read_text()
    assert "data:image/png;base64," in (tmp_path / "eval" / "report.html").read_text()
    hybrid = evaluate(cfg, trained.final_weights, tmp_path / "eval-hybrid", images_per_prompt=1, hybrid_steps=4)
    assert hybrid.hybrid_steps == 4
    with pytest.raises(ValueError, match="hybrid_steps must be in"):
        evaluate(cfg, trained.final_weights, tmp_path / "bad", hybrid_steps=8)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        evaluate(cfg, tmp_path / "nowhere", tmp_path / "bad2")


def test_window_bounds_reach_the_trainer(tiny_model_dir, tmp_path):
    """window.min_left / max_left: the trained windows cycle between the bounds (metrics' window_start)."""
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", max_iterations=5, checkpoint_every=0, eval_every=0,
                      **{"window.min_left": 2, "window.max_left": 3})
    train(cfg)
    starts = [r["window_start"] for r in read_metrics(tmp_path / "run") if "window_start" in r]
    assert starts == [2, 3, 2, 3, 2]


def test_validation_prompts_that_are_also_training_prompts_are_refused(tiny_model_dir, tmp_path):
    prompts = tmp_path / "train.txt"
    prompts.write_text("a red circle on a blue background\na green square on a black background\n")
    validation = tmp_path / "validation.txt"
    validation.write_text("a green square on a black background\na white triangle on a red background\n")
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", select_best=True, prompts=str(prompts),
                      validation_prompts=str(validation))
    with pytest.raises(ValueError, match=r"1 of the 2 validation prompts .*validation\.txt.* are also training prompts"):
        train(cfg)
