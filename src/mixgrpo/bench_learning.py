"""``mixgrpo bench --learning``: held-out reward vs training time for every mode, over several seeds.

Every mode trains the same toy base model (the ``toy`` preset, ``src/mixgrpo/presets/toy.yaml``) with its own tuned learning rate
(``TUNED_LR``, chosen by ``--lr-sweep`` on the *validation* prompts, never on the reported held-out ones)
for the same number of iterations; seed k (``714 + k``) draws the prompts, the initial and the SDE
noise. The held-out combined reward (mean of the optimised rewards over the held-out prompts x 4
fixed seeds) is measured every ``iterations / 8`` iterations.

Time is the trainer's **CPU time** (``time.process_time`` of rollout + reward + update; evaluation
excluded): the runs are single-threaded (``OMP_NUM_THREADS=1``), so CPU time equals the wall time on a
dedicated core and does not depend on what else the shared machine runs. Wall seconds are recorded too.

Reported: per mode the final reward's mean and 95% CI over seeds (Student t), the gain over the base
with its CI, the time to a fixed target (the base plus half of MixGRPO's mean gain; "never" where the
mean curve does not reach it) and the time to DanceGRPO's final mean reward as a fraction of
DanceGRPO's total time. ``learning.png`` draws the mean curves with their CI bands.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mixgrpo.config import load_config
from mixgrpo.toy.pretrain import PretrainConfig, ensure_base_model

LEARNING_MODES = ("dancegrpo", "mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star")
SEED_BASE = 714
TOY_CONFIG = Path(__file__).resolve().parent / "presets" / "toy.yaml"

# The learning rate of each mode on the toy world, chosen by
#   OMP_NUM_THREADS=1 mixgrpo bench --learning --lr-sweep 5e-5,1e-4 --iterations 80
# (one seed per lr, the best final combined reward on the 12 *validation* prompts x 4 seeds, from the shipped
# base, on the toy preset with its anchor; table in the README). DanceGRPO (no step after its window: the anchor
# does not touch it) keeps its lr from the sweep before the anchor (5e-5 / 1e-4 / 2e-4: 1e-4). 2e-4 lost realism
# and diversity in every MixGRPO variant of that sweep.
TUNED_LR: dict[str, float] = {"dancegrpo": 1e-4, "mixgrpo": 1e-4, "mixgrpo-flash": 1e-4, "mixgrpo-flash-star": 1e-4,
                              "all-sde": 5e-5}

# Per-mode settings that differ from the mode preset on the toy world. DanceGRPO's eta 0.3 (FLUX, 720 px)
# injects 0.3*sqrt(-dt) per step: its groups then barely differ (within-group std of the combined reward 0.028
# vs 0.054 at eta 0.7 and 0.069 for MixGRPO's first window; README), and it learned nothing at 0.3 or 0.5 either.
TOY_MODE_OVERRIDES: dict[str, dict[str, float]] = {"dancegrpo": {"sampling.eta": 0.7}}

# What the bench's numbers and TUNED_LR's sweep were measured with, where the toy preset (tuned for `make run`'s
# demo) has since moved: the paper's progressive window over every step (Flash's tau 20, used for every
# moving-window mode), not the preset's shorter cycle (edges 4..11, tau 10); one process of 4 prompts x 8 images
# with micro-batches of 8; no weight EMA.
# ... and the base model they were measured from: the 12000-step one, which the wheel ships beside the default.
BENCH_BASE = PretrainConfig(steps=12000)
BENCH_SETTINGS: dict[str, int | float] = {"window.shift_interval": 20, "window.min_left": 0, "window.max_left": -1,
                                          "prompts_per_iteration": 4, "optim.train_batch_size": 8,
                                          "optim.ema_decay": 0.0}

# Two-sided 95% Student t quantiles t_{0.975, df}; beyond the table the normal 1.96.
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile_975(df: int) -> float:
    """t_{0.975, df} from the table (the nearest smaller tabulated df, conservative), 1.96 beyond 30."""
    if df < 1:
        return float("nan")
    if df > 30:
        return 1.96
    return _T975[max(k for k in _T975 if k <= df)]


def mean_ci95(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): ``mean -+ t_{0.975, n-1} * s / sqrt(n)`` (s the unbiased std); n = 1 gives (x, nan, nan)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def learning_curve(metrics_path: Path, reward_names: list[str]) -> list[dict]:
    """Per evaluation: iteration, cumulative training CPU and wall seconds, held-out combined reward."""
    cpu = wall = 0.0
    curve = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "seconds" in record:
            wall += record["seconds"]["total"]
            cpu += record["seconds"].get("cpu_total", record["seconds"]["total"])
        if "held_out" in record:
            combined = sum(record["held_out"][n] for n in reward_names) / len(reward_names)
            curve.append({"iteration": record["iteration"], "cpu_s": cpu, "wall_s": wall, "combined": combined})
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve (time, reward) reaches ``target`` (linear interpolation between evaluations)."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= target:
            return t0 + (t1 - t0) * (target - r0) / (r1 - r0)
    return None


def mean_curve(runs: list[list[dict]]) -> list[dict]:
    """Seed-mean curve: at each evaluation index, the mean time and the reward's mean and 95% CI."""
    length = min(len(run) for run in runs)
    out = []
    for k in range(length):
        mean, low, high = mean_ci95([run[k]["combined"] for run in runs])
        out.append({"iteration": runs[0][k]["iteration"], "cpu_s": sum(run[k]["cpu_s"] for run in runs) / len(runs),
                    "wall_s": sum(run[k]["wall_s"] for run in runs) / len(runs), "mean": mean, "low": low, "high": high})
    return out


def plot_curves(curves: dict[str, list[dict]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for mode, curve in curves.items():
        t = [p["cpu_s"] for p in curve]
        line, = ax.plot(t, [p["mean"] for p in curve], "o-", ms=3, label=mode)
        if all(math.isfinite(p["low"]) for p in curve):
            ax.fill_between(t, [p["low"] for p in curve], [p["high"] for p in curve], color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training CPU seconds (one thread)")
    ax.set_ylabel("held-out combined reward (mean, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _config(mode: str, seed: int, lr: float, iterations: int, output_dir: Path, eval_prompts: str = ""):
    base = ensure_base_model(config=BENCH_BASE, progress=False)
    return load_config(TOY_CONFIG, {**BENCH_SETTINGS, **TOY_MODE_OVERRIDES.get(mode, {}), "model.path": str(base),
        "mode": mode, "seed": seed, "optim.lr": lr, "max_iterations": iterations,
        "eval_every": max(iterations // 8, 1), "eval_images_per_prompt": 4, "eval_prompts": eval_prompts,
        "select_best": False, "early_stop_patience": 0,
        "checkpoint_every": 0, "output_dir": str(output_dir), "progress_bar": False})


def run_learning_bench(args: argparse.Namespace) -> int:
    from mixgrpo.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iterations = 24 if args.quick else args.iterations
    modes = args.modes.split(",") if args.modes else list(LEARNING_MODES)
    if args.lr_sweep:
        return run_sweep(out, modes, [float(v) for v in args.lr_sweep.split(",")], iterations, args.json)
    for mode in modes:
        for k in range(args.seeds):
            run_dir = out / mode / f"seed{k}"
            if (run_dir / "metrics.jsonl").is_file() and _finished(run_dir / "metrics.jsonl") and not args.rerun:
                print(f"[bench --learning] {mode} seed {k}: done before, reusing {run_dir}", flush=True)
                continue
            print(f"[bench --learning] {mode} seed {k}: {iterations} iterations, lr {TUNED_LR[mode]:g}", flush=True)
            train(_config(mode, SEED_BASE + k, TUNED_LR[mode], iterations, run_dir))
    return summarize(out, modes, args.seeds, args.json)


def _finished(metrics: Path) -> bool:
    return any(json.loads(line).get("final") for line in metrics.read_text().splitlines())


def run_sweep(out: Path, modes: list[str], lrs: list[float], iterations: int, as_json: bool) -> int:
    """One seed per (mode, lr), evaluated on the validation prompts; the best final reward picks the lr."""
    from mixgrpo.train import load_prompts, train

    validation = out / "validation_prompts.txt"
    validation.write_text("\n".join(load_prompts("", "validation")) + "\n")
    names = load_config(TOY_CONFIG).rewards.names
    results: dict[str, dict[str, float]] = {}
    for mode in modes:
        results[mode] = {}
        for lr in lrs:
            run_dir = out / "sweep" / mode / f"lr{lr:g}"
            if not ((run_dir / "metrics.jsonl").is_file() and _finished(run_dir / "metrics.jsonl")):
                print(f"[bench --learning --lr-sweep] {mode} lr {lr:g}: {iterations} iterations", flush=True)
                train(_config(mode, SEED_BASE, lr, iterations, run_dir, eval_prompts=str(validation)))
            results[mode][f"{lr:g}"] = learning_curve(run_dir / "metrics.jsonl", names)[-1]["combined"]
    best = {mode: max(scores, key=scores.get) for mode, scores in results.items()}
    (out / "sweep.json").write_text(json.dumps({"validation_final_combined": results, "best_lr": best}, indent=1))
    print(f"\n{'mode':<20}" + "".join(f"{'lr ' + k:>11}" for k in results[modes[0]]) + f"{'best':>9}")
    for mode, scores in results.items():
        print(f"{mode:<20}" + "".join(f"{v:>11.4f}" for v in scores.values()) + f"{best[mode]:>9}")
    if as_json:
        print(json.dumps({"best_lr": best, "validation_final_combined": results}))
    return 0


def summarize(out: Path, modes: list[str], seeds: int, as_json: bool = False) -> int:
    """Seed means, CIs, times to target, table and plot from a finished ``bench --learning`` run in ``out``."""
    names = load_config(TOY_CONFIG).rewards.names
    runs = {mode: [learning_curve(out / mode / f"seed{k}" / "metrics.jsonl", names) for k in range(seeds)] for mode in modes}
    curves = {mode: mean_curve(r) for mode, r in runs.items()}
    base = curves[modes[0]][0]["mean"]
    mix_gain = curves["mixgrpo"][-1]["mean"] - base if "mixgrpo" in curves else float("nan")
    target = base + 0.5 * mix_gain
    dance = curves.get("dancegrpo")
    dance_final, dance_total = (dance[-1]["mean"], dance[-1]["cpu_s"]) if dance else (float("nan"), float("nan"))
    summary: dict = {"base": base, "target": target, "target_rule": "base + 0.5 x MixGRPO's mean gain", "seeds": seeds,
                     "dancegrpo_final_mean": dance_final, "dancegrpo_cpu_s": dance_total, "modes": {}}
    for mode, curve in curves.items():
        finals = [run[-1]["combined"] for run in runs[mode]]
        final, low, high = mean_ci95(finals)
        _, gain_low, gain_high = mean_ci95([f - base for f in finals])
        points = [(p["cpu_s"], p["mean"]) for p in curve]
        reach_target = time_to_reach(points, target)
        reach_dance = time_to_reach(points, dance_final) if dance else None
        summary["modes"][mode] = {
            "lr": TUNED_LR[mode], "final_mean": final, "final_ci95": [low, high], "gain": final - base,
            "gain_ci95": [gain_low, gain_high], "cpu_s": curve[-1]["cpu_s"], "wall_s": curve[-1]["wall_s"],
            "time_to_target": reach_target, "time_to_dancegrpo_final": reach_dance,
            "ratio_to_dancegrpo_time": None if reach_dance is None else reach_dance / dance_total}
    summary["checks"] = issue_checks(summary["modes"])
    summary["plot"] = str(plot_curves(curves, out / "learning.png"))
    (out / "learning.json").write_text(json.dumps({"summary": summary, "curves": curves, "runs": runs}, indent=1))
    print(f"\nheld-out combined reward, {seeds} seeds (mean [95% CI]); base {base:.4f}; target {target:.4f} "
          f"(base + half of MixGRPO's gain); times are training CPU seconds")
    print(f"{'mode':<20}{'lr':>8}{'final':>8}{'CI95':>17}{'gain CI95':>19}{'cpu s':>8}{'to target':>11}{'to Dance final':>16}{'ratio':>7}")
    for mode, row in summary["modes"].items():
        ci = f"[{row['final_ci95'][0]:.3f}, {row['final_ci95'][1]:.3f}]"
        gain_ci = f"[{row['gain_ci95'][0]:+.3f}, {row['gain_ci95'][1]:+.3f}]"
        to_target = "never" if row["time_to_target"] is None else f"{row['time_to_target']:.0f}"
        to_dance = "never" if row["time_to_dancegrpo_final"] is None else f"{row['time_to_dancegrpo_final']:.0f}"
        ratio = "-" if row["ratio_to_dancegrpo_time"] is None else f"{row['ratio_to_dancegrpo_time']:.2f}"
        print(f"{mode:<20}{row['lr']:>8g}{row['final_mean']:>8.4f}{ci:>17}{gain_ci:>19}{row['cpu_s']:>8.0f}{to_target:>11}{to_dance:>16}{ratio:>7}")
    for name, verdict in summary["checks"].items():
        print(f"{'yes' if verdict else ('n/a' if verdict is None else 'NO'):>4}  {name}")
    print(f"plot: {summary['plot']}")
    if as_json:
        print(json.dumps(summary))
    return 0


def issue_checks(modes: dict[str, dict]) -> dict[str, bool | None]:
    """The comparison's claims, each True / False (None where a mode it needs was not run):
    DanceGRPO gains (gain CI above 0); MixGRPO ends at or above DanceGRPO's final mean and reaches it in at
    most half of DanceGRPO's time; Flash* ends within MixGRPO's CI."""
    dance, mix, star = (modes.get(m) for m in ("dancegrpo", "mixgrpo", "mixgrpo-flash-star"))
    ratio = mix and mix["ratio_to_dancegrpo_time"]
    return {
        "DanceGRPO improves on the base (gain CI above 0)": dance and dance["gain_ci95"][0] > 0,
        "MixGRPO ends at or above DanceGRPO's final mean": (dance and mix) and mix["final_mean"] >= dance["final_mean"],
        "MixGRPO reaches DanceGRPO's final mean in <= 50% of its time": (dance and mix) and ratio is not None and ratio <= 0.5,
        "Flash* ends within MixGRPO's 95% CI": (mix and star) and mix["final_ci95"][0] <= star["final_mean"] <= mix["final_ci95"][1],
    }
