"""``mixgrpo bench --learning``: held-out reward vs training wall time for every mode.

Every mode trains the same toy base model with the same prompts, seeds, group size and steps
for the same number of iterations; the held-out combined reward (mean of the optimised
rewards on the held-out prompts, fixed seeds) is measured every ``eval_every`` iterations.
Time on the x axis is training time only (rollout + reward + update), not evaluation time.

The headline number is ``time_to_dancegrpo_final / dancegrpo_total``: how long MixGRPO needs to
reach the held-out reward DanceGRPO ends with, as a fraction of DanceGRPO's wall time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixgrpo.config import load_config

LEARNING_MODES = ("dancegrpo", "mixgrpo", "mixgrpo-flash", "mixgrpo-flash-star", "flow-grpo")


def learning_curve(metrics_path: Path, reward_names: list[str]) -> list[tuple[float, float]]:
    """(cumulative training seconds, held-out combined reward) at each evaluation."""
    elapsed, curve = 0.0, []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "seconds" in record:
            elapsed += record["seconds"]["total"]
        if "held_out" in record:
            curve.append((elapsed, sum(record["held_out"][n] for n in reward_names) / len(reward_names)))
    return curve


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time the curve reaches ``target`` (linear interpolation between evaluations)."""
    if curve and curve[0][1] >= target:
        return curve[0][0]
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= target:
            return t0 + (t1 - t0) * (target - r0) / (r1 - r0)
    return None


def plot_curves(curves: dict[str, list[tuple[float, float]]], png: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, curve in curves.items():
        ax.plot([t for t, _ in curve], [r for _, r in curve], "o-", ms=3, label=mode)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("held-out combined reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def run_learning_bench(args: argparse.Namespace) -> int:
    from mixgrpo.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    iterations = 24 if args.quick else args.iterations
    names: list[str] = []
    for mode in LEARNING_MODES:
        cfg = load_config("configs/toy.yaml" if Path("configs/toy.yaml").is_file() else None, {
            "mode": mode, "max_iterations": iterations, "eval_every": max(iterations // 8, 1),
            "eval_images_per_prompt": 4, "checkpoint_every": 0, "output_dir": str(out / mode), "progress_bar": False})
        names = cfg.rewards.names
        print(f"[bench --learning] {mode}: {iterations} iterations", flush=True)
        train(cfg)
    return summarize(out, names, args.json)


def summarize(out: Path, names: list[str], as_json: bool = False) -> int:
    """Curves, ratios, table and plot from the metrics of a finished ``bench --learning`` run in ``out``."""
    curves = {mode: learning_curve(out / mode / "metrics.jsonl", names) for mode in LEARNING_MODES
              if (out / mode / "metrics.jsonl").is_file()}
    dance_total, dance_final = curves["dancegrpo"][-1]
    summary: dict = {"dancegrpo_final_reward": dance_final, "dancegrpo_seconds": dance_total, "modes": {}}
    dance_best = max(r for _, r in curves["dancegrpo"][1:]) if len(curves["dancegrpo"]) > 1 else dance_final
    summary["dancegrpo_best_reward"] = dance_best
    for mode, curve in curves.items():
        reach, reach_best = time_to_reach(curve, dance_final), time_to_reach(curve[1:], dance_best)
        summary["modes"][mode] = {"final_reward": curve[-1][1], "seconds": curve[-1][0], "time_to_dancegrpo_final": reach,
                                  "ratio_to_dancegrpo_time": None if reach is None else reach / dance_total,
                                  "time_to_dancegrpo_best": reach_best,
                                  "ratio_best_to_dancegrpo_time": None if reach_best is None else reach_best / dance_total}
    summary["plot"] = str(plot_curves(curves, out / "learning.png"))
    (out / "learning.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    print(f"\nDanceGRPO: final {dance_final:.4f}, best after the start {dance_best:.4f}, {dance_total:.0f} s")
    print(f"{'mode':<20}{'final reward':>13}{'train s':>9}{'s to Dance final':>18}{'ratio':>7}{'s to Dance best':>17}{'ratio':>7}")
    for mode, row in summary["modes"].items():
        cells = []
        for key, ratio_key in (("time_to_dancegrpo_final", "ratio_to_dancegrpo_time"), ("time_to_dancegrpo_best", "ratio_best_to_dancegrpo_time")):
            cells.append("never" if row[key] is None else f"{row[key]:.0f}")
            cells.append("-" if row[ratio_key] is None else f"{row[ratio_key]:.2f}")
        print(f"{mode:<20}{row['final_reward']:>13.4f}{row['seconds']:>9.0f}{cells[0]:>18}{cells[1]:>7}{cells[2]:>17}{cells[3]:>7}")
    print(f"plot: {summary['plot']}")
    if as_json:
        print(json.dumps(summary))
    return 0
