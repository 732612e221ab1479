"""``mixgrpo bench --learning``: seed statistics, times to target and the summary table on synthetic runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mixgrpo.bench_learning import mean_ci95, mean_curve, summarize, time_to_reach

NAMES = ["toy_object_color", "toy_background", "toy_shape"]


def test_mean_ci95_is_the_student_t_interval():
    mean, low, high = mean_ci95([1.0, 2.0, 3.0])
    # s = 1, n = 3, t_{0.975, 2} = 4.303: half-width 4.303 / sqrt(3)
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / math.sqrt(3)) and mean - low == pytest.approx(high - mean)
    assert math.isnan(mean_ci95([0.5])[1])


def test_time_to_reach_interpolates_and_says_never():
    curve = [(0.0, 0.5), (10.0, 0.6), (20.0, 0.8)]
    assert time_to_reach(curve, 0.7) == pytest.approx(15.0)
    assert time_to_reach(curve, 0.5) == 0.0
    assert time_to_reach(curve, 0.9) is None


def write_run(directory: Path, finals: list[float], cpu_per_iteration: float) -> None:
    """A metrics.jsonl with a base evaluation, 4 iterations and evaluations at 2 and 4 (combined = the value)."""
    directory.mkdir(parents=True)
    lines = []
    for iteration, value in zip((0, 2, 4), finals):
        if iteration:
            lines += [{"iteration": iteration - 1 + k, "seconds": {"total": 2 * cpu_per_iteration, "cpu_total": cpu_per_iteration}}
                      for k in range(2)]
        lines.append({"iteration": iteration, "held_out": {name: value for name in NAMES}, **({"final": True} if iteration == 4 else {})})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_summary_reports_ci_times_to_target_and_ratio(tmp_path, capsys):
    # dancegrpo: slow and small gain; mixgrpo: fast and large gain; three seeds each
    for k, (dance_final, mix_final) in enumerate([(0.55, 0.70), (0.56, 0.72), (0.54, 0.68)]):
        write_run(tmp_path / "dancegrpo" / f"seed{k}", [0.5, 0.52, dance_final], cpu_per_iteration=4.0)
        write_run(tmp_path / "mixgrpo" / f"seed{k}", [0.5, 0.62, mix_final], cpu_per_iteration=2.0)
    summarize(tmp_path, ["dancegrpo", "mixgrpo"], seeds=3, as_json=True)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["base"] == pytest.approx(0.5) and summary["target"] == pytest.approx(0.5 + 0.5 * 0.2)
    mix, dance = summary["modes"]["mixgrpo"], summary["modes"]["dancegrpo"]
    assert mix["final_mean"] == pytest.approx(0.70) and mix["gain_ci95"][0] > 0
    assert dance["cpu_s"] == pytest.approx(16.0) and mix["cpu_s"] == pytest.approx(8.0)
    # mixgrpo reaches Dance's final mean 0.55 between its evaluations at 0 (0.5) and 4 s (0.62)
    assert mix["time_to_dancegrpo_final"] == pytest.approx(4.0 * 0.05 / 0.12)
    assert mix["ratio_to_dancegrpo_time"] == pytest.approx(mix["time_to_dancegrpo_final"] / 16.0)
    assert dance["time_to_target"] is None                                    # 0.6 is never reached
    assert (tmp_path / "learning.png").stat().st_size > 0
    checks = summary["checks"]
    assert checks["DanceGRPO improves on the base (gain CI above 0)"] is True   # gains 0.04-0.06, CI above 0
    assert checks["MixGRPO ends at or above DanceGRPO's final mean"] is True
    assert checks["MixGRPO reaches DanceGRPO's final mean in <= 50% of its time"] is True  # 1.67 s of 16 s
    assert checks["Flash* ends within MixGRPO's 95% CI"] is None              # Flash* was not run


def test_mean_curve_averages_time_and_reward_per_evaluation():
    runs = [[{"iteration": 0, "cpu_s": 0.0, "wall_s": 0.0, "combined": 0.5}, {"iteration": 2, "cpu_s": 4.0, "wall_s": 8.0, "combined": 0.6}],
            [{"iteration": 0, "cpu_s": 0.0, "wall_s": 0.0, "combined": 0.5}, {"iteration": 2, "cpu_s": 6.0, "wall_s": 9.0, "combined": 0.7}]]
    curve = mean_curve(runs)
    assert curve[1]["cpu_s"] == 5.0 and curve[1]["mean"] == pytest.approx(0.65)


def test_checks_fail_when_the_baseline_does_not_learn(tmp_path, capsys):
    for k, dance_final in enumerate([0.49, 0.51, 0.50]):
        write_run(tmp_path / "dancegrpo" / f"seed{k}", [0.5, 0.5, dance_final], cpu_per_iteration=4.0)
        write_run(tmp_path / "mixgrpo" / f"seed{k}", [0.5, 0.55, 0.6 + 0.01 * k], cpu_per_iteration=2.0)
        write_run(tmp_path / "mixgrpo-flash-star" / f"seed{k}", [0.5, 0.5, 0.5], cpu_per_iteration=1.0)
    summarize(tmp_path, ["dancegrpo", "mixgrpo", "mixgrpo-flash-star"], seeds=3, as_json=True)
    output = capsys.readouterr().out
    checks = json.loads(output.strip().splitlines()[-1])["checks"]
    assert checks["DanceGRPO improves on the base (gain CI above 0)"] is False
    assert checks["Flash* ends within MixGRPO's 95% CI"] is False           # 0.5 is below MixGRPO's [0.585, 0.635]
    assert "  NO  DanceGRPO improves on the base" in output


def test_bench_config_keeps_what_its_numbers_were_measured_with(tmp_path: Path):
    """The toy preset moves with `make run` (window bounds, batch, EMA); the bench's configs must not move with it."""
    from mixgrpo.bench_learning import BENCH_SETTINGS, TUNED_LR, _config
    from mixgrpo.config import flat_config

    for mode in ("mixgrpo", "mixgrpo-flash"):
        cfg = flat_config(_config(mode, 714, TUNED_LR[mode], 100, tmp_path))
        assert {k: cfg[k] for k in BENCH_SETTINGS} == BENCH_SETTINGS
        assert (cfg["window.min_left"], cfg["window.max_left"], cfg["window.shift_interval"]) == (0, -1, 20)
        assert cfg["optim.ema_decay"] == 0.0 and cfg["prompts_per_iteration"] == 4 and cfg["optim.lr"] == TUNED_LR[mode]
        record = json.loads((Path(cfg["model.path"]) / "pretrain.json").read_text())  # the base it was measured from
        assert record["config"]["steps"] == 12000 and record["seed"] == 0
