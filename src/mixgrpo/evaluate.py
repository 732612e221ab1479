"""Base vs tuned evaluation: every held-out prompt, the same seeds, every configured reward, 95% CIs.

Writes into ``out_dir``:
  metrics.json        base / tuned / delta per reward, ``ci95`` (bootstrap over prompts), combined
                      (mean of the optimised rewards) with ``delta_ci95`` and ``gap_closed``, provenance
  scores.jsonl        one line per image: prompt, seed, model (base / tuned), every reward, file
  images/             every image: ``base/p003_s1.png`` = prompt 3, seed 1
  grid.png            rows = prompts; left half base, right half tuned (same seeds, column by column)
  report.md / .html   provenance, warnings, the table with CIs, every image with its scores, the
                      training curves (the HTML embeds the images, so the KFP UI renders one artifact)
  rewards.png         rollout rewards (smoothed) and every held-out evaluation vs iteration (when given)

Images come from :mod:`mixgrpo.eval_sampler`, the sampler the trainer's own evaluation uses.
Optional hybrid inference: the tuned model for the first ``hybrid_steps`` steps, the base model
for the rest (the late, low-noise steps are where reward hacking lives).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixgrpo.config import TrainConfig
from mixgrpo.eval_sampler import DIVERSITY, eval_seeds, evaluate_policy
from mixgrpo.grids import image_grid, to_pil
from mixgrpo.models.base import FlowModel
from mixgrpo.policies import build_policy
from mixgrpo.rewards.base import build_reward
from mixgrpo.stats import bootstrap_ci, paired_bootstrap_ci
from mixgrpo.toy.pretrain import base_model_label
from mixgrpo.train import load_prompts

# The published reporting scales (spec section 7/9): HPS raw cosine, PickScore /100, ImageReward as its
# library reports it ((r - 0.16717)/1.03334), UnifiedReward's 1-5 alignment score. Training may use others.
REPORTING_OPTIONS: dict[str, dict[str, str]] = {"pickscore": {"normalize": "report"}, "imagereward": {"normalize": "standard"}}
TOY_REWARD_MAX = 1.0
"""Every toy reward lies in [0, 1]: the combined toy reward's gap to close is ``1 - base``."""


def combined_max(optimised: list[str]) -> float | None:
    """The best possible combined (mean of optimised) reward, when known: 1.0 for toy rewards."""
    return TOY_REWARD_MAX if optimised and all(n.startswith("toy_") for n in optimised) else None


def gap_closed(base: float, tuned: float, best: float | None) -> float | None:
    """``(tuned - base) / (best - base)``: the share of the gap to the best possible reward closed."""
    if best is None or not best > base:
        return None
    return (tuned - base) / (best - base)


@dataclass
class EvalResult:
    base: dict[str, float]
    tuned: dict[str, float]
    delta: dict[str, float]
    combined: dict[str, Any]
    """Mean of the optimised rewards (the default promotion-gate metric): base, tuned, delta, delta_ci95, gap_closed."""
    prompts: int
    images_per_prompt: int
    hybrid_steps: int | None
    held_out: list[str] = field(default_factory=list)
    out_dir: str = ""
    optimised: list[str] = field(default_factory=list)
    ci95: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    """Per measure: 95% bootstrap CIs over prompts of ``base``, ``tuned`` and the paired ``delta``."""
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def kind(self, name: str) -> str:
        """"optimised" or "held_out" (held-out rewards and the seed diversity are never optimised)."""
        return "optimised" if name in self.optimised or (not self.optimised and name not in self.held_out
                                                           and name != DIVERSITY) else "held_out"

    def warnings(self) -> list[str]:
        """Held-out measures that fall, and rewards whose delta CI lies entirely below 0."""
        out = []
        for name, delta in self.delta.items():
            low, high = self.ci95.get(name, {}).get("delta", [math.nan, math.nan])
            significant = math.isfinite(high) and high < 0
            if self.kind(name) == "held_out" and delta < 0:
                out.append(f"held-out {name} falls {self.base[name]:.4f} -> {self.tuned[name]:.4f} ({delta:+.4f}, "
                           f"95% CI [{low:+.4f}, {high:+.4f}]{', entirely below 0' if significant else ''})")
            elif significant:
                out.append(f"optimised {name} falls {delta:+.4f}, 95% CI [{low:+.4f}, {high:+.4f}] entirely below 0")
        return out


def load_tuned_policy(cfg: TrainConfig, tuned_dir: str | Path, device: torch.device) -> FlowModel:
    """The base adapter of ``cfg`` with the tuned weights of ``tuned_dir`` (full transformer or LoRA)."""
    tuned_dir = Path(tuned_dir)
    check_weights_dir(tuned_dir)
    policy = build_policy(cfg, device)
    if hasattr(policy, "load_tuned"):  # adapters that know their own formats (FLUX: transformer/ or LoRA)
        policy.load_tuned(tuned_dir)
    else:
        transformer_dir = tuned_dir / "transformer" if (tuned_dir / "transformer").is_dir() else tuned_dir
        if not (transformer_dir / "config.json").is_file():
            raise FileNotFoundError(f"{transformer_dir} has no config.json: expected the tuned transformer in diffusers "
                                    "layout (the trainer writes it to OUTPUT_DIR/final/transformer)")
        policy.module = type(policy.module).from_pretrained(transformer_dir).to(device)
    policy.module.eval()
    return policy


WEIGHTS_FIX = ("copy the complete OUTPUT_DIR/final folder again, or fetch CHECKPOINT_URI/final "
               "(mixgrpo.storage.fetch_dir verifies every file), or re-run training")


def check_weights_dir(directory: Path) -> None:
    """Fail with the file and the fix, before any model loads, when a tuned-weights folder is unusable.

    With a ``MANIFEST.json`` (a folder fetched from the store) every listed file is checked (size,
    sha256); then every ``*.json`` must parse, every ``*.safetensors`` header and length must be
    whole, and each folder with a ``config.json`` must hold its weights (``*.safetensors`` or a
    sharded index), or the folder a LoRA file.
    """
    from safetensors import safe_open

    from mixgrpo.storage import MANIFEST_NAME, StorageError, verify_local_dir

    if not directory.is_dir():
        raise FileNotFoundError(f"tuned weights folder {directory} does not exist (no config.json to load): "
                                "pass OUTPUT_DIR/final of a training run")
    if (directory / MANIFEST_NAME).is_file():
        try:
            verify_local_dir(directory)
        except StorageError as error:
            raise ValueError(f"tuned weights: {error}; {WEIGHTS_FIX}") from None
    for file in sorted(directory.rglob("*.json")):
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(f"tuned weights file {file} is not valid JSON ({error}); {WEIGHTS_FIX}") from None
    for file in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"tuned weights file {file} is not a complete safetensors file ({error}); {WEIGHTS_FIX}") from None
    for config in sorted(directory.rglob("config.json")):
        folder = config.parent
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.index.json")):
            raise FileNotFoundError(f"tuned weights folder {folder} has config.json but no *.safetensors weights "
                                    f"(expected diffusion_pytorch_model.safetensors): the folder is partial; {WEIGHTS_FIX}")


def evaluate(cfg: TrainConfig, tuned_dir: str | Path, out_dir: str | Path, *, prompts: list[str] | None = None,
             images_per_prompt: int = 4, hybrid_steps: int | None = None, training_metrics: str | Path | None = None,
             provenance: dict[str, Any] | None = None, device: str | None = None) -> EvalResult:
    """Score base and tuned models on every held-out prompt x ``images_per_prompt`` seeds; write the report."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = prompts if prompts is not None else load_prompts(cfg.eval_prompts, "test")
    if not prompts:
        raise ValueError("no evaluation prompts: give a prompt file with at least one prompt")
    if hybrid_steps is not None and not 0 < hybrid_steps < cfg.sampling.num_steps:
        raise ValueError(f"hybrid_steps must be in (0, {cfg.sampling.num_steps}); got {hybrid_steps}")

    base = build_policy(cfg, dev)
    base.module.eval()
    tuned = load_tuned_policy(cfg, tuned_dir, dev)
    optimised = list(cfg.rewards.names)
    names = list(dict.fromkeys(optimised + cfg.rewards.held_out))
    rewards = {name: build_reward(name, **{**cfg.rewards.options.get(name, {}), **REPORTING_OPTIONS.get(name, {})})
               for name in names}
    base_images, base_scores, base_pp = evaluate_policy(base, rewards, prompts, images_per_prompt, cfg, dev)
    tuned_images, tuned_scores, tuned_pp = evaluate_policy([tuned, base] if hybrid_steps else tuned, rewards, prompts,
                                                           images_per_prompt, cfg, dev, switch_step=hybrid_steps)
    combined_pp = {"base": torch.stack([base_pp[n] for n in optimised]).mean(0),
                   "tuned": torch.stack([tuned_pp[n] for n in optimised]).mean(0)}
    measures = names + [DIVERSITY]
    mean = {"base": {n: float(torch.nanmean(base_pp[n])) for n in measures},
            "tuned": {n: float(torch.nanmean(tuned_pp[n])) for n in measures}}
    ci95 = {n: {"base": list(bootstrap_ci(base_pp[n].numpy())), "tuned": list(bootstrap_ci(tuned_pp[n].numpy())),
                "delta": list(paired_bootstrap_ci(tuned_pp[n].numpy(), base_pp[n].numpy()))} for n in measures}
    cb, ct = float(combined_pp["base"].nanmean()), float(combined_pp["tuned"].nanmean())
    combined = {"base": cb, "tuned": ct, "delta": ct - cb,
                "base_ci95": list(bootstrap_ci(combined_pp["base"].numpy())),
                "tuned_ci95": list(bootstrap_ci(combined_pp["tuned"].numpy())),
                "delta_ci95": list(paired_bootstrap_ci(combined_pp["tuned"].numpy(), combined_pp["base"].numpy())),
                "max": combined_max(optimised), "gap_closed": gap_closed(cb, ct, combined_max(optimised))}
    result = EvalResult(
        base=mean["base"], tuned=mean["tuned"], delta={n: mean["tuned"][n] - mean["base"][n] for n in measures},
        combined=combined, prompts=len(prompts), images_per_prompt=images_per_prompt, hybrid_steps=hybrid_steps,
        held_out=list(cfg.rewards.held_out), out_dir=str(out), optimised=optimised, ci95=ci95,
        provenance={**config_provenance(cfg, training_metrics), **(provenance or {})},
    )
    (out / "metrics.json").write_text(result.to_json())
    write_images(out, prompts, images_per_prompt, {"base": (base_images, base_scores), "tuned": (tuned_images, tuned_scores)},
                 optimised)
    side_by_side_grid(base_images, tuned_images, images_per_prompt, prompts).save(out / "grid.png")
    if training_metrics and Path(training_metrics).is_file():
        plot_training_rewards(training_metrics, out / "rewards.png")
    write_report(out)
    return result


def config_provenance(cfg: TrainConfig, training_metrics: str | Path | None = None) -> dict[str, Any]:
    """What produced the tuned weights: mode, iterations, learning rate, processes, weight average, base model, git sha."""
    from mixgrpo.provenance import resolve_git_sha

    iterations, selected, processes = cfg.max_iterations, {}, 1
    if training_metrics and Path(training_metrics).is_file():
        records = [json.loads(line) for line in Path(training_metrics).read_text().splitlines() if line.strip()]
        iterations = max((r.get("iteration", 0) for r in records), default=iterations)
        processes = max((r.get("processes", 1) for r in records), default=1)
        chosen = [r["selected_iteration"] for r in records if "selected_iteration" in r]
        if chosen:  # select_best: the weights are those of the best validation evaluation, not the last
            selected = {"weights_of_iteration": f"{chosen[-1]} (best validation evaluation of {iterations})"}
    average = {"weight_average": f"EMA, decay {cfg.optim.ema_decay}"} if cfg.optim.ema_decay else {}
    return {"mode": cfg.mode, "iterations": iterations, **selected, **average, "learning_rate": cfg.optim.lr,
            "processes": processes, "model_kind": cfg.model.kind,
            "base_model": base_model_label(cfg.model.path), "git_sha": resolve_git_sha(), "seed": cfg.seed}


def image_name(model: str, prompt_index: int, seed: int) -> str:
    """``images/{model}/p{prompt:03d}_s{seed}.png``: the file of one evaluation image."""
    return f"images/{model}/p{prompt_index:03d}_s{seed}.png"


def write_images(out: Path, prompts: list[str], per_prompt: int, models: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 optimised: list[str]) -> None:
    """Every image as a PNG and one ``scores.jsonl`` line per image (prompt, seed, model, scores, file)."""
    seeds = eval_seeds(per_prompt)
    lines = []
    for model, (images, scores) in models.items():
        (out / "images" / model).mkdir(parents=True, exist_ok=True)
        for row in range(images.shape[0]):
            p, k = divmod(row, per_prompt)
            name = image_name(model, p, seeds[k])
            to_pil(images[row]).save(out / name)
            values = {n: float(v[row]) for n, v in scores.items()}
            combined = sum(values[n] for n in optimised) / len(optimised) if optimised else math.nan
            lines.append(json.dumps({"prompt_index": p, "prompt": prompts[p], "seed": seeds[k], "model": model,
                                     "combined": combined, "scores": values, "file": name}))
    (out / "scores.jsonl").write_text("\n".join(lines) + "\n")


def side_by_side_grid(base: torch.Tensor, tuned: torch.Tensor, per_prompt: int, prompts: list[str]):
    """Rows = prompts; columns = base images then tuned images (same seeds in the same order)."""
    rows = []
    for r in range(len(prompts)):
        rows.append(base[r * per_prompt:(r + 1) * per_prompt])
        rows.append(tuned[r * per_prompt:(r + 1) * per_prompt])
    interleaved = torch.cat([torch.cat(rows[i:i + 2]) for i in range(0, len(rows), 2)])
    labels = [f"base x{per_prompt}" for _ in range(per_prompt)] + [f"tuned x{per_prompt}" for _ in range(per_prompt)]
    return image_grid(interleaved, columns=2 * per_prompt, scale=3, row_labels=prompts, label_width=230,
                      column_labels=[label if i % per_prompt == 0 else "" for i, label in enumerate(labels)])


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_training_rewards(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Left: rollout reward means per iteration (faint) and smoothed; right: every held-out evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "rewards" in r]
    held = sorted((r for r in records if "held_out" in r), key=lambda r: r["iteration"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    window = max(1, len(train_records) // 10)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(train_records[0]["rewards"] if train_records else {}):
        x = [r["iteration"] for r in train_records]
        y = [r["rewards"][name]["mean"] for r in train_records]
        left.plot(x, y, color=colors[i % len(colors)], alpha=0.2, linewidth=0.8)
        left.plot(x, smooth(y, window), color=colors[i % len(colors)], label=name)
    left.set_title(f"rollout rewards (moving average of {window})")
    for i, name in enumerate(held[0]["held_out"] if held else {}):
        points = [(r["iteration"], r["held_out"][name]) for r in held if name in r["held_out"]]
        right.plot(*zip(*points), "o-", color=colors[i % len(colors)], label=name, markersize=4)
    right.set_title(f"held-out evaluations ({len(held)} points)")
    for ax in (left, right):
        ax.set_xlabel("iteration")
        ax.set_ylabel("reward")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(png_path)


def _ci(pair: list[float] | None) -> str:
    return f"[{pair[0]:+.4f}, {pair[1]:+.4f}]" if pair and all(math.isfinite(x) for x in pair) else "n/a"


def table_rows(result: EvalResult) -> list[tuple[str, str, float, float, float, str]]:
    """(measure, kind, base, tuned, delta, delta CI) per measure, then the combined optimised reward."""
    rows = [(name, result.kind(name), result.base[name], result.tuned[name], result.delta[name],
             _ci(result.ci95.get(name, {}).get("delta"))) for name in result.base]
    c = result.combined
    rows.append(("combined (mean of optimised)", "optimised", c["base"], c["tuned"], c["tuned"] - c["base"],
                 _ci(c.get("delta_ci95"))))
    return rows


def metrics_table(result: EvalResult) -> str:
    """The Markdown table (also what the console prints)."""
    lines = ["| reward | kind | base | tuned | delta | delta 95% CI |", "|---|---|---:|---:|---:|---|"]
    for name, kind, base, tuned, delta, ci in table_rows(result):
        label = f"**{name}**" if name.startswith("combined") else name
        lines.append(f"| {label} | {kind} | {base:.4f} | {tuned:.4f} | {delta:+.4f} | {ci} |")
    gap = result.combined.get("gap_closed")
    if gap is not None:
        lines.append(f"\ngap to the best combined reward ({result.combined['max']:g}) closed: {100 * gap:.1f}%")
    return "\n".join(lines)


def write_report(out: str | Path, provenance: dict[str, Any] | None = None) -> None:
    """report.md and report.html from ``out``'s metrics.json, scores.jsonl, images and plots.

    ``provenance`` adds to (and is saved into) metrics.json first, e.g. the registered model version.
    """
    out = Path(out)
    metrics = json.loads((out / "metrics.json").read_text())
    if provenance:
        metrics["provenance"] = {**metrics.get("provenance", {}), **provenance}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    result = EvalResult(**{k: v for k, v in metrics.items() if k in EvalResult.__dataclass_fields__})
    hybrid = (f"hybrid inference: tuned for the first {result.hybrid_steps} steps, base after" if result.hybrid_steps
              else "tuned model for every step")
    intro = (f"{result.prompts} held-out prompts x {result.images_per_prompt} seeds, the same seeds for both models; "
             f"{hybrid}. 95% CIs: bootstrap over prompts (paired for deltas).")
    warnings = result.warnings()
    prov = result.provenance
    md = [f"# Evaluation: base vs tuned\n\n{intro}\n",
          "Provenance: " + ", ".join(f"{k} `{v}`" for k, v in prov.items()) + "\n"]
    md += [f"> **Warning:** {w}\n" for w in warnings]
    md += [metrics_table(result), "\n![base vs tuned, every held-out prompt](grid.png)\n"]
    if (out / "rewards.png").is_file():
        md.append("![rewards during training](rewards.png)\n")
    (out / "report.md").write_text("\n".join(md))

    esc = html.escape
    prov_rows = "".join(f"<tr><th>{esc(str(k))}</th><td>{esc(str(v))}</td></tr>" for k, v in prov.items())
    warn = "".join(f"<div class='warn'>&#9888; {esc(w)}</div>" for w in warnings)
    rows = "".join(
        f"<tr class='{'combined' if name.startswith('combined') else kind}'><td>{esc(name)}</td><td>{kind}</td>"
        f"<td>{b:.4f}</td><td>{t:.4f}</td><td class='{'neg' if d < 0 else 'pos'}'>{d:+.4f}</td><td>{ci}</td></tr>"
        for name, kind, b, t, d, ci in table_rows(result))
    gap = result.combined.get("gap_closed")
    gap_text = (f"<p>Gap to the best combined reward ({result.combined['max']:g}) closed: <b>{100 * gap:.1f}%</b></p>"
                if gap is not None else "")
    plots = (f"<h3>Training</h3><img class='plot' src='data:image/png;base64,{_b64(out / 'rewards.png')}'>"
             if (out / "rewards.png").is_file() else "")
    (out / "report.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixgrpo evaluation</title><style>"
        "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
        "tr.combined{font-weight:bold;background:#eef5ff}tr.held_out td:nth-child(2){color:#7a4b00}"
        ".neg{color:#b00020}.pos{color:#0a6b2b}.warn{background:#fff3cd;border:1px solid #e0b100;padding:6px 10px;margin:4px 0}"
        ".prov td{text-align:left;font-family:monospace}.plot{max-width:100%}.gallery td{vertical-align:top;text-align:center;font-size:10px;border:none;padding:2px}"
        ".gallery img{width:96px;height:96px;image-rendering:pixelated;display:block}"
        ".gallery .prompt{text-align:left;font-size:12px;max-width:180px}.gallery .sep{border-left:2px solid #888}"
        "</style></head><body>"
        f"<h2>Evaluation: base vs tuned</h2><p>{esc(intro)}</p>{warn}"
        f"<h3>Provenance</h3><table class='prov'>{prov_rows}</table>"
        "<h3>Rewards</h3><table><tr><th>measure</th><th>kind</th><th>base</th><th>tuned</th><th>delta</th>"
        f"<th>delta 95% CI</th></tr>{rows}</table>{gap_text}{plots}"
        f"<h3>Every held-out prompt (left: base, right: tuned, same seeds)</h3>{_gallery(out, result)}</body></html>")


def _gallery(out: Path, result: EvalResult) -> str:
    """An HTML table: one row per prompt, each image with its combined score and every reward under it."""
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines() if line.strip()]
    by_prompt: dict[int, dict[str, list[dict]]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_index"], {}).setdefault(r["model"], []).append(r)
    short = {name: name.removeprefix("toy_").replace("heldout_", "") for name in result.base}
    rows = []
    for p in sorted(by_prompt):
        cells = []
        for model in ("base", "tuned"):
            for i, r in enumerate(by_prompt[p].get(model, [])):
                scores = "<br>".join(f"{html.escape(short.get(n, n))} {v + 0.0:.2f}".replace("-0.00", "0.00")
                                     for n, v in r["scores"].items())
                cells.append(f"<td class='{'sep' if model == 'tuned' and i == 0 else ''}'>"
                             f"<img src='data:image/png;base64,{_b64(out / r['file'])}' title='{model} seed {r['seed']}'>"
                             f"<b>{model} s{r['seed']}: {r['combined']:.2f}</b><br>{scores}</td>")
        prompt = next(iter(by_prompt[p].values()))[0]["prompt"]
        rows.append(f"<tr><td class='prompt'>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
    return f"<table class='gallery'>{''.join(rows)}</table>"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()
