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
    for (t0, r0), (t1, r1) in zip(curve, curve[1:]):
        if r1 >= target:
            if r0 >= target:
                return t0
            return t0 + (t1 - t0) * (target - r0) / (r1 - r0)
    return curve[0][0] if curve and curve[0][1] >= target else None


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
    curves: dict[str, list[tuple[float, float]]] = {}
    names: list[str] = []
    for mode in LEARNING_MODES:
        cfg = load_config("configs/toy.yaml" if Path("configs/toy.yaml").is_file() else None, {
            "mode": mode, "max_iterations": iterations, "eval_every": max(iterations // 8, 1),
            "eval_images_per_prompt": 4, "checkpoint_every": 0, "output_dir": str(out / mode), "progress_bar": False})
        names = cfg.rewards.names
        print(f"[bench --learning] {mode}: {iterations} iterations", flush=True)
        train(cfg)
        curves[mode] = learning_curve(out / mode / "metrics.jsonl", names)
    dance_total, dance_final = curves["dancegrpo"][-1]
    summary: dict = {"dancegrpo_final_reward": dance_final, "dancegrpo_seconds": dance_total, "modes": {}}
    for mode, curve in curves.items():
        reach = time_to_reach(curve, dance_final)
        summary["modes"][mode] = {"final_reward": curve[-1][1], "seconds": curve[-1][0], "time_to_dancegrpo_final": reach,
                                  "ratio_to_dancegrpo_time": None if reach is None else reach / dance_total}
    summary["plot"] = str(plot_curves(curves, out / "learning.png"))
    (out / "learning.json").write_text(json.dumps({"summary": summary, "curves": curves}, indent=1))
    print(f"\n{'mode':<20}{'final reward':>13}{'train s':>9}{'s to DanceGRPO final':>22}{'ratio':>7}")
    for mode, row in summary["modes"].items():
        reach = "never" if row["time_to_dancegrpo_final"] is None else f"{row['time_to_dancegrpo_final']:.0f}"
        ratio = "-" if row["ratio_to_dancegrpo_time"] is None else f"{row['ratio_to_dancegrpo_time']:.2f}"
        print(f"{mode:<20}{row['final_reward']:>13.4f}{row['seconds']:>9.0f}{reach:>22}{ratio:>7}")
    print(f"plot: {summary['plot']}")
    if args.json:
        print(json.dumps(summary))
    return 0
