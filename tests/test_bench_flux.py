"""The FLUX-shaped bench (``mixgrpo bench --model flux``) and the update variants it measures, on tiny widths."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from mixgrpo.bench_flux import FLUX_BENCH_MODES, PeakMemory, extrapolate
from mixgrpo.cli import main as cli_main
from mixgrpo.config import load_config
from mixgrpo.models.random_flux import FLUX_DEV_ARCHITECTURE, FluxShape, build_random_flux_policy, rope_axes
from mixgrpo.sampling import flow_sigmas
from mixgrpo.train import load_prompts, rollout_phase, update_phase
from mixgrpo.update_variants import first_microbatch_numerics, recompute_old_log_probs, update_phase_batched

TINY = ["--heads", "2", "--head-dim", "16", "--text-dim", "32", "--pooled-dim", "32", "--text-tokens", "8",
        "--resolution", "32", "--group-size", "4", "--train-batch-size", "2", "--device", "cpu"]
TINY_SHAPE = FluxShape(double=1, single=1, resolution=32, heads=2, head_dim=16, text_dim=32, pooled_dim=32, text_tokens=8)
# toy `mixgrpo bench --json` keys (mixgrpo.bench.run_speed_bench) + the FLUX ones
TOY_KEYS = {"window_0", "schedule_average", "overhead_fraction", "prefix_check", "model"}
FLUX_KEYS = {"peak_memory_bytes", "per_block", "extrapolated_full_model", "ratio_first_microbatch",
             "clip_fraction_first_microbatch", "numerics", "window_batching", "setup"}
# group of 4, micro-batches of 2 -> 2 micro-batches; T = 25, window 4, DanceGRPO trains int(24*0.6) = 14 steps
EXPECTED_NFE = {"dancegrpo": (25, 28), "mixgrpo": (25, 8), "mixgrpo-flash": (11, 8), "mixgrpo-flash-star": (7, 8)}


def run_cli(capsys, *args: str) -> dict:
    assert cli_main(["bench", "--model", "flux", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_flux_bench_cli_json(capsys, tmp_path):
    r = run_cli(capsys, "--blocks", "1,1", *TINY, "--sweep", "2", "--prefix-check", "--out", str(tmp_path))
    assert TOY_KEYS | FLUX_KEYS <= set(r)
    assert set(r["window_0"]) == set(FLUX_BENCH_MODES) == set(r["peak_memory_bytes"])
    dance = r["window_0"]["dancegrpo"]["seconds_per_iteration"]
    for mode, row in r["window_0"].items():
        assert (row["nfe_old"], row["nfe_train"]) == EXPECTED_NFE[mode]
        assert row["ratio_to_dancegrpo"] == pytest.approx(row["seconds_per_iteration"] / dance, rel=1e-12)
        assert row["peak_memory_bytes"] == r["peak_memory_bytes"][mode] > 0
        assert 0 < row["rollout_seconds"] + row["update_seconds"] <= row["seconds_per_iteration"]
        assert row["row_evals_old"] == 4 * row["nfe_old"] and row["row_evals_train"] == 2 * row["nfe_train"]
        # 19 + 38 blocks cost more than 1 + 1
        assert r["extrapolated_full_model"][mode]["seconds_per_iteration"] > row["seconds_per_iteration"]
    avg = r["schedule_average"]
    assert avg["mixgrpo"]["window_positions"] == 2 and avg["mixgrpo"]["schedule_positions"] == 23
    assert avg["mixgrpo"]["ratio_to_dancegrpo"] == pytest.approx(
        avg["mixgrpo"]["seconds_per_iteration"] / avg["dancegrpo"]["seconds_per_iteration"], rel=1e-12)
    # fp32 on the CPU: the first micro-batch (rows of 2) recomputes the rollout's (rows of 4) log-probs
    assert abs(r["ratio_first_microbatch"] - 1) < 1e-5
    assert r["numerics"]["rollout"]["ratio_max_abs_deviation"] < 1e-5 and r["clip_fraction_first_microbatch"] == 0
    assert abs(r["numerics"]["trainer_ratio_first_step"] - 1) < 1e-5
    assert set(r["per_block"]) == {"double", "single"}
    assert r["per_block"]["double"]["forward_rows"] == 4 and r["per_block"]["double"]["forward_backward_rows"] == 2
    assert r["prefix_check"]["nfe_ratio"] == pytest.approx((8 + 4 * 17) / (4 * 25))
    assert r["window_batching"]["step_loop_seconds"] > 0 and r["window_batching"]["batched_seconds"] > 0
    assert r["setup"]["parameters"] == r["setup"]["trainable_parameters"] and r["setup"]["image_tokens"] == 4
    assert json.loads((tmp_path / "flux_speed.json").read_text())["window_0"] == r["window_0"]


def test_flux_bench_lora_batched_recompute(capsys, tmp_path):
    r = run_cli(capsys, "--blocks", "0,2", *TINY, "--lora", "2", "--window-batching", "--old-logprobs", "recompute",
                "--modes", "dancegrpo,mixgrpo", "--out", str(tmp_path))
    assert set(r["window_0"]) == {"dancegrpo", "mixgrpo"} and r["prefix_check"] is None
    assert 0 < r["setup"]["trainable_parameters"] < r["setup"]["parameters"]
    assert set(r["per_block"]) == {"single"}
    for mode, row in r["window_0"].items():
        assert (row["nfe_old"], row["nfe_train"]) == EXPECTED_NFE[mode]
        assert row["row_evals_recompute"] == row["row_evals_train"]  # one no-grad forward per trained row
    assert r["numerics"]["old_log_probs"] == "recompute" and r["numerics"]["recompute"]["ratio_max_abs_deviation"] == 0


@pytest.mark.slow
@pytest.mark.integration
def test_flux_bench_fsdp_two_processes(tmp_path):
    """--engine fsdp under torchrun (2 gloo processes): every block sharded, rank 0 reports for its shard."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mixgrpo.cli",
               "bench", "--model", "flux", "--engine", "fsdp", "--blocks", "1,1", *TINY, "--modes", "dancegrpo,mixgrpo",
               "--out", str(tmp_path), "--json"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["setup"]["world_size"] == 2 and r["setup"]["engine"] == "fsdp"
    for mode, row in r["window_0"].items():
        assert (row["nfe_old"], row["nfe_train"]) == EXPECTED_NFE[mode] and row["peak_memory_bytes"] > 0
    assert abs(r["ratio_first_microbatch"] - 1) < 1e-5


def tiny_flux_policy():
    return build_random_flux_policy(TINY_SHAPE, torch.device("cpu"))


def tiny_toy_policy():
    from mixgrpo.toy.model import ToyFlowModel, ToyModelConfig

    return ToyFlowModel(ToyModelConfig(num_layers=1, num_single_layers=1, num_attention_heads=1, attention_head_dim=32))


@pytest.mark.parametrize("make_policy", [tiny_flux_policy, tiny_toy_policy], ids=["flux-shaped", "toy"])
@pytest.mark.parametrize("mode,window", [("mixgrpo", range(2, 6)), ("dancegrpo", range(0, 25))], ids=["mixgrpo", "dancegrpo"])
def test_batched_window_gives_the_step_loop_gradients(make_policy, mode, window):
    """One optimiser step (SGD, lr 1000, both micro-batches accumulated): weight change = -1000 x gradient
    (the large rate puts the change far above the float32 rounding of the weights)."""
    torch.manual_seed(0)
    device = torch.device("cpu")
    base = make_policy()
    cfg = load_config(overrides={"mode": mode, "sampling.group_size": 4, "optim.train_batch_size": 2,
                                 "optim.gradient_accumulation_steps": 2, "optim.max_grad_norm": 1e9,
                                 "rewards.held_out": []})
    sigmas = flow_sigmas(cfg.sampling.num_steps, cfg.sampling.shift)
    batch = rollout_phase(base, [load_prompts("", "train")[0]], cfg, window, 0, 0, device, sigmas)
    advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
    deltas, stats = [], []
    for update in (update_phase, update_phase_batched):
        policy = copy.deepcopy(base)
        before = {n: p.detach().clone() for n, p in policy.module.named_parameters()}
        optimizer = torch.optim.SGD(list(policy.trainable_parameters()), lr=1000.0)
        stats.append(update(policy, optimizer, batch, advantages, cfg, 0, 0, device))
        deltas.append({n: p.detach() - before[n] for n, p in policy.module.named_parameters()})
    moved = max(float(d.abs().max()) for d in deltas[0].values())
    assert moved > 1e-3, "the update did not move the weights; the comparison would prove nothing"
    worst = max(float((deltas[0][n] - deltas[1][n]).abs().max()) for n in deltas[0])
    assert worst <= 1e-5 * moved, f"batched-window gradients differ by {worst:.3g} (largest change {moved:.3g})"
    assert stats[0].nfe_train == stats[1].nfe_train and stats[0].optimizer_steps == stats[1].optimizer_steps == 1
    if mode == "mixgrpo":  # the same steps for every row: the same per-step statistics
        assert stats[0].ratios == pytest.approx(stats[1].ratios, abs=1e-6)
        assert stats[0].loss == pytest.approx(stats[1].loss, abs=1e-6)
    else:  # DanceGRPO's steps are drawn per sample: the step loop groups rows by step, the batch by position
        assert all(r == pytest.approx(1.0, abs=1e-6) for r in stats[0].ratios + stats[1].ratios)


def test_recompute_keeps_untrained_steps_and_matches_in_float32():
    device = torch.device("cpu")
    policy = build_random_flux_policy(TINY_SHAPE, device, seed=1)
    cfg = load_config(overrides={"mode": "dancegrpo", "sampling.group_size": 4, "optim.train_batch_size": 1,
                                 "rewards.held_out": []})
    batch = rollout_phase(policy, ["a blue ball"], cfg, range(0, 25), 3, 0, device, flow_sigmas(25, 3.0))
    for batched in (False, True):
        fresh = recompute_old_log_probs(policy, batch, cfg, 3, 0, device, batched=batched)
        changed = fresh.rollout.log_probs != batch.rollout.log_probs
        assert torch.allclose(fresh.rollout.log_probs, batch.rollout.log_probs, atol=1e-5, rtol=0)
        assert int(changed.sum()) <= 4 * 14  # only the 14 trained steps of each 1-row micro-batch are rewritten
        numerics = first_microbatch_numerics(policy, batch, cfg, 3, 0, device, batched=batched)
        assert abs(numerics["ratio_mean"] - 1) < 1e-5 and numerics["clip_fraction"] == 0


def test_recomputed_old_log_probs_give_ratio_exactly_one_under_bf16():
    """bf16 autocast, rollout of 4 rows vs micro-batches of 1: after the recompute the update's first
    forward repeats the recompute's computation, so the ratio is 1 exactly."""
    device = torch.device("cpu")
    policy = build_random_flux_policy(TINY_SHAPE, device, weights_dtype=torch.bfloat16, seed=2)
    cfg = load_config(overrides={"mode": "mixgrpo", "sampling.group_size": 4, "optim.train_batch_size": 1,
                                 "model.mixed_precision": "bf16", "rewards.held_out": []})
    batch = rollout_phase(policy, ["a green cone"], cfg, range(5, 9), 0, 0, device, flow_sigmas(25, 3.0))
    for batched in (False, True):
        before = first_microbatch_numerics(policy, batch, cfg, 0, 0, device, batched=batched)
        fresh = recompute_old_log_probs(policy, batch, cfg, 0, 0, device, batched=batched)
        after = first_microbatch_numerics(policy, fresh, cfg, 0, 0, device, batched=batched)
        assert before["ratio_max_abs_deviation"] < 1e-2
        assert after == {"ratio_mean": 1.0, "ratio_max_abs_deviation": 0.0, "clip_fraction": 0.0}


def test_flux_dev_shape_and_stand_ins():
    shape = FluxShape()
    assert shape.architecture() == FLUX_DEV_ARCHITECTURE and rope_axes(128) == (16, 56, 56)
    assert shape.image_tokens == 2025 and FluxShape(resolution=64).image_tokens == 16
    with pytest.raises(ValueError, match="multiple of 16"):
        FluxShape(resolution=100)
    policy = build_random_flux_policy(TINY_SHAPE, torch.device("cpu"))
    cond = policy.encode_prompts(["x", "y", "x"])
    assert cond["encoder_hidden_states"].shape == (3, 8, 32) and cond["pooled_projections"].shape == (3, 32)
    assert torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][2])
    images = policy.decode(torch.randn(2, *policy.latent_shape()))
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_peak_memory_sees_a_transient_allocation():
    with PeakMemory(torch.device("cpu")) as memory:
        start = PeakMemory.rss_bytes()
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        block.add_(1)
        import time

        time.sleep(0.05)
        del block
    assert memory.peak - start >= 60 * 2**20


def test_extrapolate_adds_the_missing_blocks():
    per_block = {"double": {"forward_seconds_per_row": 1.0, "forward_backward_seconds_per_row": 3.0},
                 "single": {"forward_seconds_per_row": 0.5, "forward_backward_seconds_per_row": 1.5}}
    row = {"seconds_per_iteration": 10.0, "row_evals_old": 4, "row_evals_train": 2, "row_evals_recompute": 1}
    # double: 18 missing x (5*1 + 2*3) = 198; single: 36 missing x (5*0.5 + 2*1.5) = 198
    assert extrapolate(row, per_block, (1, 2), (19, 38))["seconds_per_iteration"] == pytest.approx(10 + 198 + 198)
